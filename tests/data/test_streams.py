"""The streaming reader: shard URL forms, epoch exactness over ranks x workers, resampling, mixing,
exact resume, and the device prefetcher's pass-through on CPU."""

import functools
import http.server
import io
import json
import os
import threading
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mtx_data_pipelines.loader import Loader, LoaderStateError, StreamConfig
from mtx_data_pipelines.sources import ShardSpecError, scheme, split_sources


def _jpeg(seed: int, px: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(d, prefix: str, counts: list[int]) -> tuple[str, list[str]]:
    """Shards ``prefix-00000i.tar`` with ``counts[i]`` samples each; (brace spec, all keys)."""
    os.makedirs(d, exist_ok=True)
    keys = []
    for i, n in enumerate(counts):
        with wds.TarWriter(os.path.join(d, f"{prefix}-{i:06d}.tar")) as sink:
            for j in range(n):
                key = f"{prefix}{i}-{j:03d}"
                keys.append(key)
                sink.write({"__key__": key, "jpg": _jpeg(len(keys)), "txt": f"sample {key}".encode()})
    return f"{d}/{prefix}-{{000000..{len(counts) - 1:06d}}}.tar", keys


def _cfg(spec, **kw):
    base = dict(shards=spec, batch_size=4, image_size=16, context_length=16, workers=2, shuffle_buffer=8)
    return StreamConfig(**{**base, **kw})


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


# -- URL forms -------------------------------------------------------------------------------------

@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path``, stopped after the test."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_every_url_form_reads_the_same_samples(tmp_path, http_root):
    spec, keys = write_shards(tmp_path, "u", [5, 6])
    rel = "u-{000000..000001}.tar"
    forms = {
        "local": spec,
        "file": f"file://{tmp_path}/{rel}",
        "pipe": f"pipe:cat {tmp_path}/{rel}",
        "http": f"{http_root}/{rel}",
    }
    assert [scheme(split_sources(f)[0][0][0]) for f in forms.values()] == ["local", "local", "pipe", "http"]
    reference = None
    for name, form in forms.items():
        loader = Loader(_cfg(form, train=False, workers=0))
        batches = list(loader)
        got = [k for b in batches for k in b["key"]]
        assert got == keys, name
        images = torch.cat([b["image"] for b in batches])
        if reference is None:
            reference = images
        assert torch.equal(images, reference), name
        assert sum(loader.skipped.values()) == 0


def test_pipe_commands_start_with_no_signal_blocked():
    """A loader worker keeps SIGTERM blocked (its own thread takes it); the command of a pipe: shard
    must not inherit that, or a job-wide SIGTERM would not stop it."""
    import signal

    from mtx_data_pipelines.sources import open_shard
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        with open_shard("pipe:grep SigBlk /proc/self/status") as stream:
            line = stream.read().decode()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    assert int(line.split()[1], 16) == 0, line


def test_remote_shards_are_not_checked_at_startup_and_failures_count(tmp_path, http_root):
    spec, keys = write_shards(tmp_path, "r", [4])
    with pytest.raises(FileNotFoundError, match="1 of 1 shards"):
        Loader(_cfg(str(tmp_path / "absent-000000.tar")))
    # Two absent remote shards (HTTP 404) and a failing command: accepted at startup, counted when read.
    bad = f"{http_root}/absent-{{0..1}}.tar::pipe:exit 3::{spec}"
    loader = Loader(_cfg(bad, train=False, workers=0))
    assert [k for b in loader for k in b["key"]] == keys
    assert loader.skipped == Counter(tar_error=3)


# -- epoch mode: exactly once per epoch over 2 ranks x 2 workers -----------------------------------

@pytest.mark.parametrize("counts", [[7, 13, 9, 11, 10], [9, 4, 12], [6, 6, 6, 6, 6, 6, 6, 6]],
                         ids=["5-uneven", "3-fewer-than-streams", "8-even"])
def test_epoch_zero_is_every_key_exactly_once_over_ranks_and_workers(tmp_path, counts):
    spec, keys = write_shards(tmp_path, "e", counts)
    tagged: dict[int, list[str]] = {0: [], 1: []}
    for rank in (0, 1):
        # A stream's share of an epoch is at most 24 samples (two shards of 13 + 11); 16 batches of 4
        # per rank = 32 samples per worker drain epoch 0 of both (the shuffle buffer never mixes epochs).
        for b in _take(Loader(_cfg(spec, rank=rank, world_size=2)), 16):
            assert len(b["epoch"]) == len(b["key"]) == 4
            for k, e in zip(b["key"], b["epoch"]):
                tagged.setdefault(e, []).append(k)
    assert sorted(tagged[0]) == sorted(keys)  # the multiset: no sample twice, none missing
    assert len(set(tagged[1])) == len(tagged[1]) and set(tagged[1]) <= set(keys)


def test_resampled_mode_draws_shards_with_replacement_and_resumes_exactly(tmp_path):
    spec, keys = write_shards(tmp_path, "s", [5, 5, 5])
    cfg = _cfg(spec, mode="resampled")
    reference = _take(Loader(cfg), 24)
    assert {k for b in reference for k in b["key"]} <= set(keys)
    # Each worker draws ceil(3 / 2) = 2 shards per round: with replacement a round can hold the same
    # shard twice (1 in 3 per round; with this seed it happens, as seeded runs are deterministic).
    per_round = Counter((b["worker"], e, k) for b in reference for k, e in zip(b["key"], b["epoch"]))
    assert max(per_round.values()) == 2
    assert [b["key"] for b in _take(Loader(cfg), 24)] == [b["key"] for b in reference]  # seeded
    ranks = [[b["key"] for b in _take(Loader(_cfg(spec, mode="resampled", rank=r, world_size=2)), 6)] for r in (0, 1)]
    assert ranks[0] != ranks[1]  # (rank, worker) in the seed
    _check_resume(cfg, reference, (5, 13))


def _check_resume(cfg, reference, cut_points):
    for k in cut_points:
        first = Loader(cfg)
        _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = Loader(cfg)
        resumed.load_state_dict(state)
        for ref, got in zip(reference[k:], _take(resumed, len(reference) - k)):
            assert got["key"] == ref["key"] and got["epoch"] == ref["epoch"]
            assert torch.equal(got["image"], ref["image"]) and torch.equal(got["text"], ref["text"])


# -- mixing ------------------------------------------------------------------------------------------

def test_mixing_follows_the_weights_and_resumes_exactly(tmp_path):
    a, a_keys = write_shards(tmp_path / "a", "a", [30, 30])
    b, b_keys = write_shards(tmp_path / "b", "b", [10])
    cfg = _cfg(f"{a}::{b}", weights="0.7,0.3", batch_size=8)
    reference = _take(Loader(cfg), 50)  # 400 samples; source b (10 samples) goes round ~12 epochs
    sources = [s for batch in reference for s in batch["source"]]
    keys = [k for batch in reference for k in batch["key"]]
    assert all(k in (a_keys if s == 0 else b_keys) for k, s in zip(keys, sources))
    share = sources.count(0) / len(sources)
    # A binomial share over 400 picks has sd 0.023: 0.7 +- 0.07 is a 3-sd band.
    assert abs(share - 0.7) < 0.07, share
    # each source on its own still covers its epoch 0 exactly once per worker pair
    epoch0_b = [k for batch in reference for k, s, e in zip(batch["key"], batch["source"], batch["epoch"])
                if s == 1 and e == 0]
    assert sorted(epoch0_b) == sorted(b_keys)
    _check_resume(cfg, reference, (3, 21))


def test_mixing_spec_errors_name_the_problem(tmp_path):
    a, _ = write_shards(tmp_path, "m", [2])
    with pytest.raises(ShardSpecError, match="2 mixing weights for 1 sources"):
        Loader(_cfg(a, weights="0.5,0.5"))
    with pytest.raises(ShardSpecError, match="comma-separated numbers"):
        Loader(_cfg(f"{a}::{a}", weights="a,b"))
    with pytest.raises(LoaderStateError, match="weights, mode"):
        Loader(_cfg(f"{a}::{a}", weights="1,1")).load_state_dict(Loader(_cfg(f"{a}::{a}", weights="1,2")).state_dict())


# -- feeding ------------------------------------------------------------------------------------------

def test_prefetcher_passes_through_on_cpu_with_the_loader_state(tmp_path):
    from mtx_dist.data import DevicePrefetcher

    spec, _ = write_shards(tmp_path, "p", [12])
    loader = Loader(_cfg(spec, workers=0))
    feed = DevicePrefetcher(loader, torch.device("cpu"))
    it = iter(feed)
    for n in range(1, 4):
        batch = next(it)
        assert batch["image"].device.type == "cpu"
        assert feed.state_dict() == loader.state_dict() and feed.state_dict()["batches"] == n


def _sum_skips_over_ranks() -> dict:
    import torch.distributed as dist

    from mtx_dist.data import skipped_totals

    rank = dist.get_rank()
    mine = Counter(corrupt_image=1 + rank, tar_error=rank)  # rank 0 has no tar_error key at all
    return skipped_totals(mine, None, dist.get_world_size(), torch.device("cpu"))


@pytest.mark.slow
def test_skip_counters_are_summed_over_data_parallel_ranks():
    from tests.dist import run_ranks

    totals = run_ranks(2, _sum_skips_over_ranks, timeout=120)
    assert totals[0] == totals[1]
    assert totals[0]["corrupt_image"] == 3 and totals[0]["tar_error"] == 1 and totals[0]["missing_image"] == 0
