"""Streaming WebDataset loader for image-caption pairs with exact, resumable positions.

Stream layout: the data-parallel rank ``r`` runs ``W`` loader workers; worker ``w`` is global
stream ``g = r * W + w`` of ``G = world * W``. Each source (one ``::`` part of the spec when mixing
weights are given, else the whole spec) is split over the ``G`` streams independently:

* ``epoch`` mode: in epoch ``e`` the source's shards are permuted with a seed derived from
  (seed, source, e) and dealt out whole: stream ``g`` reads shards ``g, g + G, ...`` of that order.
  With fewer shards than streams every stream reads all of them, keeping the samples whose index
  is ``g mod G``. Every sample is seen exactly once per epoch over all ranks and workers, whatever
  the shard count; streams whose epochs are longer (one shard more, bigger shards) simply reach
  their next epoch later. (Splitting only the last ``S mod G`` shards per sample would even out
  epoch lengths but make every stream read those shards: up to G times the I/O for them.)
* ``resampled`` mode: in round ``e`` stream ``g`` draws ``ceil(S / G)`` shards with replacement,
  seeded by (seed, source, e, g). Endless; no coordination between streams.

Samples then pass a shuffle buffer seeded by (seed, source, e, g). Training streams are endless
(epoch after epoch, so ranks never run dry at different times); evaluation streams make one pass.
With several weighted sources each worker picks the source of every sample with its own seeded RNG.

Every batch carries its worker's position: the number of source picks and, per source, (epoch,
samples drawn). The :class:`Loader` records the position of the last batch it handed out per worker;
restoring it makes each worker replay its streams to that point without decoding, so a resumed run
sees exactly the batches an uninterrupted one would have seen. Augmentation randomness is seeded per
sample from (seed, source, epoch, stream, index), so skipping needs no RNG replay.
"""

from __future__ import annotations

import atexit
import bisect
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import webdataset as wds

from data_pipelines.sources import list_shards, read_shard, split_sources  # noqa: F401  (list_shards re-exported)
from data_pipelines.tokenizer import ClipTokenizer
from data_pipelines.transforms import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb, eval_transform, train_transform

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MODES = ("epoch", "resampled")
# Every reason a sample or shard is skipped; the trainer sums these over ranks in this order.
SKIP_REASONS = ("tar_error", "unknown_extension", "missing_image", "missing_caption", "empty_caption",
                "bad_caption_encoding", "corrupt_image", "too_many_pixels")
log = logging.getLogger(__name__)


class LoaderStateError(ValueError):
    """A saved loader state that does not fit the loader it is restored into."""


@dataclass(frozen=True)
class StreamConfig:
    shards: str  # WebDataset spec: brace lists, several sources joined by "::"
    batch_size: int
    image_size: int
    context_length: int = 77
    train: bool = True
    seed: int = 0
    workers: int = 2
    shuffle_buffer: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    rank: int = 0
    world_size: int = 1
    worker_timeout_s: float = 600.0  # a worker silent this long (a hung pipe:, a stuck mount) raises
    weights: str = ""  # mixing weights of the "::" sources, e.g. "0.7,0.3"; "" = one concatenated source
    mode: str = "epoch"  # "epoch" (each sample once per epoch) or "resampled" (shards drawn with replacement)
    jpeg_draft: bool = False  # let libjpeg decode at a reduced scale that still covers the output size
    # False: images leave the workers as uint8 (4x less to pass between processes and to copy to the
    # device) and are normalized later in batch (transforms.normalize_images), e.g. on the GPU
    normalize: bool = True
    # > 0: each batch's text is padded only to its longest caption, rounded up to this multiple
    # (tokenizer.trimmed_length); the samples are the same, so it is not part of the resume identity
    text_pad_multiple: int = 0


def stream_identity(cfg: StreamConfig) -> str:
    """What a saved stream position is valid for: the fields that decide which samples come in which
    order and how they are transformed (not how many workers read them or how text is padded)."""
    same = {k: v for k, v in asdict(cfg).items()
            if k not in ("workers", "worker_timeout_s", "normalize", "text_pad_multiple")}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def start_position(n_sources: int) -> dict:
    return {"mix": 0, "src": [[0, 0] for _ in range(n_sources)]}


class ImageTextStream(torch.utils.data.IterableDataset):
    """Yields collated batches: image (B,3,H,W) float32, text (B,L) int64, key, epoch and source per
    sample, the worker's position and the skips since the previous batch."""

    def __init__(self, cfg: StreamConfig, start: list[dict] | None = None, first_worker: int = 0,
                 sources: tuple[list[list[str]], list[float]] | None = None) -> None:
        super().__init__()
        if cfg.mode not in MODES:
            raise ValueError(f"loader mode {cfg.mode!r}: allowed values are {', '.join(MODES)}")
        self.cfg = cfg
        self.sources, self.weights = sources if sources is not None else split_sources(cfg.shards, cfg.weights)
        self.start = start  # per worker position, or None for the beginning
        # DataLoader takes batches from its workers round-robin starting at process 0; a resumed
        # stream must continue with the logical worker whose turn is next, so process i plays
        # logical worker (first_worker + i) mod W.
        self.first_worker = first_worker

    # -- raw samples of one source -------------------------------------------------------------
    def _epoch_samples(self, s: int, epoch: int, g: int, n_streams: int, on_error) -> Iterator[dict]:
        cfg, urls = self.cfg, self.sources[s]
        if cfg.train and cfg.mode == "resampled":
            rng = random.Random(_seed(cfg.seed, s, epoch, g, 1))
            picks = [rng.choice(urls) for _ in range(-(-len(urls) // n_streams))]
            samples = itertools.chain.from_iterable(read_shard(u, on_error) for u in picks)
        else:
            order = list(urls)
            if cfg.train:
                random.Random(_seed(cfg.seed, s, epoch)).shuffle(order)
            if len(order) >= n_streams:  # whole shards dealt out; streams differ by one shard at most
                samples = itertools.chain.from_iterable(read_shard(u, on_error) for u in order[g::n_streams])
            else:  # fewer shards than streams: every stream reads all, keeping its share of samples
                samples = self._shared(order, g, n_streams, on_error)
        if cfg.train and cfg.shuffle_buffer > 1:
            rng = random.Random(_seed(cfg.seed, s, epoch, g))
            samples = wds.shuffle(cfg.shuffle_buffer, min(100, cfg.shuffle_buffer), rng=rng)(samples)
        return samples

    @staticmethod
    def _shared(urls: list[str], g: int, n_streams: int, on_error) -> Iterator[dict]:
        """Shards read by every stream, each keeping every ``n_streams``-th sample. A broken one is
        reported by one stream only, so it counts once."""
        i = 0
        for j, url in enumerate(urls):
            report = on_error if j % n_streams == g else (lambda url, exn: None)
            for sample in read_shard(url, report):
                if i % n_streams == g:
                    yield sample
                i += 1

    def _source(self, s: int, start: tuple[int, int], g: int, n_streams: int,
                on_error: Callable[[int, str, Exception], None]) -> Iterator[tuple[int, int, dict]]:
        """(epoch, index in epoch, sample) of source ``s`` from ``start``, epoch after epoch."""
        first, drawn = start
        replaying = [drawn > 0]

        def report(url: str, exn: Exception) -> None:
            if not replaying[0]:  # counted once, in the run that first met it
                on_error(epoch, url, exn)

        for epoch in itertools.count(first) if self.cfg.train else [first]:
            index = 0
            for sample in self._epoch_samples(s, epoch, g, n_streams, report):
                index += 1
                if index <= drawn:  # fast-forward to the restored position without decoding
                    replaying[0] = index < drawn
                    continue
                yield epoch, index, sample
            if index == 0 and drawn == 0 and self.cfg.train:
                raise RuntimeError(f"loader stream {g} of {n_streams} found no samples in source {s} "
                                   f"({len(self.sources[s])} shards of {self.cfg.shards!r}): fewer samples than "
                                   "data-parallel ranks x workers, or every shard unreadable")
            drawn = 0

    # -- one sample ----------------------------------------------------------------------------
    def _prepare(self, sample: dict, rng: np.random.Generator | None) -> tuple[np.ndarray, str]:
        image_bytes = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image_bytes is None and "txt" not in sample:
            raise DecodeError("unknown_extension")
        if image_bytes is None:
            raise DecodeError("missing_image")
        if "txt" not in sample:
            raise DecodeError("missing_caption")
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DecodeError("bad_caption_encoding") from None
        if not text:
            raise DecodeError("empty_caption")
        size = self.cfg.image_size
        # A random crop keeps >= 0.9 of the area at an aspect in [3/4, 4/3], so its shorter side is
        # >= ~0.82 of the image's: decoding at >= size / 0.8 never makes the crop upsample.
        draft = (size * 5 // 4 if rng is not None else size) if self.cfg.jpeg_draft else None
        img = decode_rgb(image_bytes, self.cfg.max_pixels, draft)
        norm = self.cfg.normalize
        return (train_transform(img, size, rng, norm) if rng is not None else eval_transform(img, size, norm)), text

    # -- batches -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w, n_workers = ((info.id + self.first_worker) % info.num_workers, info.num_workers) if info else (0, 1)
        g, n_streams = self.cfg.rank * n_workers + w, self.cfg.world_size * n_workers
        n_src = len(self.sources)
        start = self.start[w] if self.start else start_position(n_src)
        tokenizer = functools.partial(ClipTokenizer(context_length=self.cfg.context_length),
                                      pad_multiple=self.cfg.text_pad_multiple)
        skips: Counter = Counter()  # (epoch, reason) since the last batch; handed out with the next one

        def on_error(epoch: int, url: str, exn: Exception) -> None:  # a shard that broke off: count it, go on
            skips[epoch, "tar_error"] += 1
            log.warning("shard %s is unreadable (%s); skipping the rest of it", url, exn)

        positions = [list(p) for p in start["src"]]
        streams = [self._source(s, tuple(positions[s]), g, n_streams, on_error) for s in range(n_src)]
        picks, mix_rng = start["mix"], random.Random(_seed(self.cfg.seed, g, 2))
        cumulative = list(itertools.accumulate(self.weights))
        for _ in range(picks):  # replay the source picks made before the restored position
            mix_rng.random()

        batch: dict[str, list] = {"image": [], "text": [], "key": [], "epoch": [], "source": []}
        active = list(range(n_src))
        while active:
            if n_src > 1 and self.cfg.train:
                s = min(bisect.bisect_right(cumulative, mix_rng.random() * cumulative[-1]), n_src - 1)
                picks += 1
            else:  # one source, or evaluation: the sources one after the other
                s = active[0]
            try:
                epoch, index, sample = next(streams[s])
            except StopIteration:  # evaluation streams end
                active.remove(s)
                continue
            positions[s] = [epoch, index]
            rng = np.random.default_rng([self.cfg.seed, s, epoch, g, index]) if self.cfg.train else None
            try:
                image, text = self._prepare(sample, rng)
            except DecodeError as e:
                skips[epoch, e.reason] += 1
                continue
            for k, v in (("image", image), ("text", text), ("key", sample["__key__"]), ("epoch", epoch),
                         ("source", s)):
                batch[k].append(v)
            if len(batch["image"]) == self.cfg.batch_size:
                yield self._collate(batch, tokenizer, w, {"mix": picks, "src": [list(p) for p in positions]}, skips)
                batch = {k: [] for k in batch}
                skips.clear()
        if batch["image"]:
            yield self._collate(batch, tokenizer, w, {"mix": picks, "src": positions}, skips)

    @staticmethod
    def _collate(batch: dict, tokenizer, worker: int, position: dict, skips: Counter) -> dict:
        return {
            "image": torch.from_numpy(np.stack(batch["image"])),
            "text": torch.from_numpy(tokenizer(batch["text"])),
            "key": batch["key"],
            "epoch": batch["epoch"],
            "source": batch["source"],
            "worker": worker,
            "position": position,
            "skipped": dict(sum((Counter({r: n}) for (_, r), n in skips.items()), Counter())),
            # the same per epoch of the skipped sample: a check of "one epoch" needs the skips of epoch 0
            # that come after its last good sample, handed out with the first batch of epoch 1
            "skipped_by_epoch": [[e, r, n] for (e, r), n in sorted(skips.items())],
        }


# Released loaders: their workers may now die on SIGTERM. Set for every live loader at interpreter
# exit too: this atexit hook is registered after multiprocessing's (torch imported it above), so it
# runs first, before multiprocessing SIGTERMs and joins the remaining workers.
_unreleased: set = set()
atexit.register(lambda: [e.set() for e in list(_unreleased)])


def _worker_sigterm(released, worker_id: int) -> None:
    """Keep a loader worker alive through a job-wide SIGTERM while its trainer handles SIGTERM.

    torch makes loader workers die on SIGTERM. A cluster that preempts a job sends SIGTERM to every
    process of it; when the training process handles SIGTERM (to checkpoint first), a dead worker
    would make it fail before it can save. So a worker ignores SIGTERM until its loader is released
    (the loader is done, or the main process is exiting), after which SIGTERM stops it as before:
    torch's shutdown of a stuck worker and multiprocessing's exit still work."""
    if not callable(signal.getsignal(signal.SIGTERM)):  # the parent's handler at fork: none, keep torch's
        return

    def on_sigterm(signum, frame) -> None:
        if released.is_set():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


class Loader:
    """Iterable over batches of one rank, with ``state_dict``/``load_state_dict`` for resume."""

    def __init__(self, cfg: StreamConfig, pin_memory: bool = False) -> None:
        # Fails here, in the main process, on a wrong spec, weights or missing local file.
        self.sources, self.weights = split_sources(cfg.shards, cfg.weights)
        if cfg.mode not in MODES:
            raise ValueError(f"loader mode {cfg.mode!r}: allowed values are {', '.join(MODES)}")
        self.cfg, self.pin_memory = cfg, pin_memory
        self.n_workers = max(1, cfg.workers)
        self.positions: list[dict] = [start_position(len(self.sources))] * self.n_workers
        self.batches = 0
        self.skipped: Counter = Counter()
        self._identity = stream_identity(cfg)

    def __iter__(self) -> Iterator[dict]:
        dataset = ImageTextStream(self.cfg, list(self.positions), first_worker=self.batches % self.n_workers,
                                  sources=(self.sources, self.weights))
        released = multiprocessing.Event()
        _unreleased.add(released)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.workers,
            persistent_workers=False, prefetch_factor=4 if self.cfg.workers else None, pin_memory=self.pin_memory,
            timeout=self.cfg.worker_timeout_s if self.cfg.workers else 0,
            worker_init_fn=functools.partial(_worker_sigterm, released),
        )
        batches = iter(loader)
        try:
            for batch in batches:
                self.positions[batch["worker"]] = batch["position"]
                self.batches += 1
                self.skipped.update(batch["skipped"])
                yield batch
        finally:
            released.set()  # before torch shuts the workers down (a stuck one by SIGTERM)
            _unreleased.discard(released)
            del batches

    def state_dict(self) -> dict:
        return {"batches": self.batches, "positions": [json.loads(json.dumps(p)) for p in self.positions],
                "workers": self.n_workers, "world_size": self.cfg.world_size, "identity": self._identity,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if state["workers"] != self.n_workers or state["world_size"] != self.cfg.world_size:
            raise LoaderStateError(
                f"loader state was saved with {state['world_size']} data-parallel ranks x {state['workers']} "
                f"workers; this run has {self.cfg.world_size} x {self.n_workers}. Resuming would repeat or "
                "skip samples: keep data.workers and the data-parallel size of the saved run"
            )
        if state["identity"] != self._identity:
            raise LoaderStateError("loader state was saved for different shards, weights, mode, batch size, seed "
                                   "or transforms; exact resume is impossible")
        positions = state["positions"]
        if not all(isinstance(p, dict) and len(p.get("src", ())) == len(self.sources) for p in positions):
            raise LoaderStateError("loader state has an unknown layout (saved by an older version); exact resume "
                                   "is impossible")
        self.positions = [{"mix": int(p["mix"]), "src": [[int(e), int(d)] for e, d in p["src"]]} for p in positions]
        self.batches = state["batches"]
        self.skipped = Counter(state.get("skipped", {}))
