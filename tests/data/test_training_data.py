"""The reader inside the real trainer (micro preset, CPU fp32, in process): exact resume with mixed
sources and worker processes, and a chaos shard set with every kind of dirty data."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mtx_dist.trainer import train
from tests.dist_workers import micro_cfg
from tests.data.test_streams import _jpeg, write_shards

pytestmark = pytest.mark.slow


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _no_eval(tmp_path, *overrides):
    return micro_cfg(f"run.dir={tmp_path}/run", "run.eval_at_end=false", "run.export_at_end=false",
                     "run.log_every=1", *overrides)


def test_resume_through_the_trainer_sees_the_same_keys_and_losses(tmp_path, monkeypatch):
    a, _ = write_shards(tmp_path / "a", "a", [12, 9, 15])
    b, _ = write_shards(tmp_path / "b", "b", [10])
    common = [f"data.train={a}::{b}", "data.train_weights=0.6,0.4", f"data.val={b}", "data.workers=2",
              "data.shuffle_buffer=16", "data.batch_size=8", "run.steps=10", "optim.decay_steps=10",
              "checkpoint.every=4", "tracking.enabled=false"]
    monkeypatch.setenv("MTX_RECORD_KEYS", str(tmp_path / "whole.jsonl"))
    whole = train(_no_eval(tmp_path, *common))  # K = 4 steps, checkpoint, M = 6 more (and more checkpoints)
    monkeypatch.setenv("MTX_RECORD_KEYS", str(tmp_path / "resumed.jsonl"))
    resumed = train(_no_eval(tmp_path, *common, "checkpoint.resume=step00000004"))
    assert resumed.first_step == 4 and resumed.step == 10
    before = [r for r in _records(tmp_path / "whole.jsonl") if r["step"] >= 4]
    after = _records(tmp_path / "resumed.jsonl")
    assert [r["step"] for r in after] == list(range(4, 10))
    assert [r["key"] for r in after] == [r["key"] for r in before]
    assert {k[0] for r in after for k in r["key"]} == {"a", "b"}  # both sources in play
    assert resumed.losses == whole.losses[4:]  # bit for bit on CPU fp32


# -- dirty data ---------------------------------------------------------------------------------------

def _tar_bytes(samples):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def chaos_shards(d) -> tuple[str, list[str], dict[str, int]]:
    """Shards with every kind of dirty data: (spec, keys of good samples, injected count per reason)."""
    os.makedirs(d, exist_ok=True)
    good: list[str] = []

    def ok(key):
        good.append(key)
        return [(f"{key}.jpg", _jpeg(len(good) + 100)), (f"{key}.txt", f"a photo {key}".encode())]

    big = io.BytesIO()
    Image.new("RGB", (120, 120), (9, 9, 9)).save(big, format="JPEG")  # 14400 px > data.max_pixels = 10000
    dirty = [
        ("bad-jpeg", [("bad-jpeg.jpg", _jpeg(1)[:200] + b"\x00" * 50), ("bad-jpeg.txt", b"cut jpeg")]),
        ("not-image", [("not-image.jpg", b"plain text, not an image"), ("not-image.txt", b"text")]),
        ("no-caption", [("no-caption.jpg", _jpeg(2))]),
        ("empty-caption", [("empty-caption.jpg", _jpeg(3)), ("empty-caption.txt", b"  \n")]),
        ("latin1", [("latin1.jpg", _jpeg(4)), ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))]),
        ("huge", [("huge.jpg", big.getvalue()), ("huge.txt", b"too many pixels")]),
        ("only-xyz", [("only-xyz.xyz", b"\x01\x02")]),
    ]
    # shard 0: good samples around every kind of bad sample
    members = []
    for i, (_, files) in enumerate(dirty):
        members += ok(f"c0-{i:02d}") + files
    members += ok("c0-99")
    # shards 1 and 2: one key split over the boundary (image at the end of 1, caption at the start of 2)
    one = ok("c1-00") + ok("c1-01") + [("split.jpg", _jpeg(5))]
    two = [("split.txt", b"the other half")] + ok("c2-00") + ok("c2-01")
    for i, m in enumerate((members, one, two)):
        with open(os.path.join(d, f"chaos-{i:06d}.tar"), "wb") as f:
            f.write(_tar_bytes(m))
    # shard 3: truncated in the middle of the image of its 4th sample; the 3 samples before are good
    full = _tar_bytes([f for k in range(6) for f in ok(f"c3-{k:02d}")])
    del good[-3:]
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        member = tf.getmember("c3-03.jpg")
    with open(os.path.join(d, "chaos-000003.tar"), "wb") as f:
        f.write(full[: member.offset_data + member.size // 2])
    # shard 4: garbage bytes
    with open(os.path.join(d, "chaos-000004.tar"), "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    injected = {"corrupt_image": 2, "missing_caption": 2, "empty_caption": 1, "bad_caption_encoding": 1,
                "too_many_pixels": 1, "unknown_extension": 1, "missing_image": 1, "tar_error": 2}
    return f"{d}/chaos-{{000000..000004}}.tar", good, injected


def test_chaos_shards_train_to_the_end_with_exact_skip_counts(tmp_path, monkeypatch):
    spec, good, injected = chaos_shards(tmp_path / "chaos")
    monkeypatch.setenv("MTX_RECORD_KEYS", str(tmp_path / "keys.jsonl"))
    # 15 good samples, batches of 4 from 2 workers: 12 steps run through epoch 0 into epoch 2
    result = train(_no_eval(tmp_path, f"data.train={spec}", f"data.val={spec}", "data.workers=2",
                            "data.batch_size=4", "data.shuffle_buffer=8", "data.max_pixels=10000",
                            "run.steps=12", "checkpoint.every=12", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"))
    assert result.step == 12
    records = _records(tmp_path / "keys.jsonl")
    assert len(good) == 15
    assert sorted(k for r in records for k, e in zip(r["key"], r["epoch"]) if e == 0) == sorted(good)
    per_epoch: dict[int, dict[str, int]] = {}
    for r in records:
        for e, reason, n in r["skipped_by_epoch"]:
            per_epoch.setdefault(e, {}).setdefault(reason, 0)
            per_epoch[e][reason] += n
    assert per_epoch[0] == injected  # every injected fault, each counted once in epoch 0
    totals = {}
    for e in per_epoch.values():
        for reason, n in e.items():
            totals[reason] = totals.get(reason, 0) + n

    from mlflow.tracking import MlflowClient
    metrics = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.mlflow_run_id).data.metrics
    logged = {k[len("data/skipped_"):]: int(v) for k, v in metrics.items() if k.startswith("data/skipped_")}
    total = logged.pop("total")
    assert logged == totals  # the last logged counters = everything the 12 batches handed out, none at zero
    assert total == sum(totals.values())


def test_dali_backend_trains_and_resumes_exactly(tmp_path, monkeypatch):
    spec, _ = write_shards(tmp_path / "d", "d", [12, 9, 15])
    common = [f"data.train={spec}", f"data.val={spec}", "data.backend=dali", f"data.dali_index_dir={tmp_path}/idx",
              "data.workers=1", "data.shuffle_buffer=16", "data.batch_size=8", "run.steps=6", "optim.decay_steps=6",
              "checkpoint.every=3", "tracking.enabled=false"]
    monkeypatch.setenv("MTX_RECORD_KEYS", str(tmp_path / "whole.jsonl"))
    whole = train(_no_eval(tmp_path, *common))
    monkeypatch.setenv("MTX_RECORD_KEYS", str(tmp_path / "resumed.jsonl"))
    resumed = train(_no_eval(tmp_path, *common, "checkpoint.resume=step00000003"))
    before = [r["key"] for r in _records(tmp_path / "whole.jsonl") if r["step"] >= 3]
    assert [r["key"] for r in _records(tmp_path / "resumed.jsonl")] == before
    assert resumed.losses == whole.losses[3:]
