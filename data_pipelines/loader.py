"""Streaming WebDataset loader for image-caption pairs with exact, resumable positions.

Stream layout: the data-parallel rank ``r`` runs ``W`` loader workers; worker ``w`` is global
stream ``g = r * W + w`` of ``G = world * W``. In epoch ``e`` the shard list is permuted with a seed
derived from (seed, e), and stream ``g`` reads shards ``g, g + G, ...`` of that order (or, with fewer
shards than streams, every shard keeping samples ``g mod G``), through a shuffle buffer seeded by
(seed, e, g). Training streams are endless (epoch after epoch); evaluation streams make one pass.

Every batch carries its worker's position (epoch, samples drawn from the shuffled stream). The
:class:`Loader` records the position of the last batch it handed out per worker; restoring it
makes each worker replay its stream up to that point without decoding, so a resumed run sees
exactly the batches an uninterrupted one would have seen. Augmentation randomness is seeded per
sample from (seed, epoch, stream, index), so skipping needs no RNG replay.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import webdataset as wds
from webdataset.shardlists import expand_urls

from data_pipelines.tokenizer import ClipTokenizer
from data_pipelines.transforms import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb, eval_transform, train_transform

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
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


def list_shards(spec: str) -> list[str]:
    """Expand a shard spec; local shards (plain or ``file://`` paths) must exist."""
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    local = [u.removeprefix("file://") for u in urls if "://" not in u.removeprefix("file://") and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards in {spec!r} do not exist "
                                f"(first: {missing[0]})")
    return urls


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class ImageTextStream(torch.utils.data.IterableDataset):
    """Yields collated batches: image (B,3,H,W) float32, text (B,L) int64, keys, position, skips."""

    def __init__(self, cfg: StreamConfig, start: list[tuple[int, int]] | None = None, first_worker: int = 0,
                 urls: list[str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.urls = urls if urls is not None else list_shards(cfg.shards)
        self.start = start  # per worker (epoch, samples already drawn), or None for the beginning
        # DataLoader takes batches from its workers round-robin starting at process 0; a resumed
        # stream must continue with the logical worker whose turn is next, so process i plays
        # logical worker (first_worker + i) mod W.
        self.first_worker = first_worker

    # -- raw samples -------------------------------------------------------------------------
    def _raw(self, epoch: int, g: int, n_streams: int, on_error) -> Iterator[dict]:
        order = list(self.urls)
        if self.cfg.train:
            random.Random(_seed(self.cfg.seed, epoch)).shuffle(order)
        per_sample_split = len(order) < n_streams
        mine = order if per_sample_split else order[g::n_streams]
        samples = self._read_shards(mine, on_error)
        if per_sample_split:
            samples = (s for i, s in enumerate(samples) if i % n_streams == g)
        if self.cfg.train and self.cfg.shuffle_buffer > 1:
            rng = random.Random(_seed(self.cfg.seed, epoch, g))
            samples = wds.shuffle(self.cfg.shuffle_buffer, min(100, self.cfg.shuffle_buffer), rng=rng)(samples)
        return samples

    @staticmethod
    def _read_shards(urls: list[str], on_error) -> Iterator[dict]:
        """Samples of each shard in turn. A shard that fails to read (truncated, corrupt, missing)
        yields what came before the failure and is reported once to ``on_error``; reading shards
        one at a time also keeps a key at the end of one shard from merging with the next shard's."""
        for url in urls:
            errors: list[Exception] = []

            def keep_going(exn: Exception, errors: list = errors) -> bool:
                errors.append(exn)
                return True

            yield from wds.tarfile_to_samples(handler=keep_going)([{"url": url}])
            if errors:
                on_error(url, errors[0])

    # -- one sample ----------------------------------------------------------------------------
    def _prepare(self, sample: dict, rng: np.random.Generator | None) -> tuple[np.ndarray, str]:
        image_bytes = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
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
        img = decode_rgb(image_bytes, self.cfg.max_pixels)
        size = self.cfg.image_size
        return (train_transform(img, size, rng) if rng is not None else eval_transform(img, size)), text

    # -- batches -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w, n_workers = ((info.id + self.first_worker) % info.num_workers, info.num_workers) if info else (0, 1)
        g, n_streams = self.cfg.rank * n_workers + w, self.cfg.world_size * n_workers
        epoch, drawn = self.start[w] if self.start else (0, 0)
        tokenizer = ClipTokenizer(context_length=self.cfg.context_length)
        skips: Counter = Counter()  # since the last batch; handed out with the next one
        replaying = drawn > 0

        def on_error(url: str, exn: Exception) -> None:  # a shard that broke off: count it, go on
            if not replaying:  # counted once, in the run that first met it
                skips["tar_error"] += 1
                log.warning("shard %s is unreadable after its first samples (%s); skipping the rest", url, exn)

        images, texts, keys = [], [], []
        epochs = itertools.count(epoch) if self.cfg.train else [0]
        for epoch in epochs:
            index = 0
            for sample in self._raw(epoch, g, n_streams, on_error):
                index += 1
                if index <= drawn:  # fast-forward to the restored position without decoding
                    continue
                replaying = False
                rng = np.random.default_rng([self.cfg.seed, epoch, g, index]) if self.cfg.train else None
                try:
                    image, text = self._prepare(sample, rng)
                except DecodeError as e:
                    skips[e.reason] += 1
                    continue
                images.append(image), texts.append(text), keys.append(sample["__key__"])
                if len(images) == self.cfg.batch_size:
                    yield self._collate(images, texts, keys, tokenizer, w, (epoch, index), skips)
                    images, texts, keys = [], [], []
                    skips.clear()
            if index == 0 and drawn == 0 and self.cfg.train:
                raise RuntimeError(f"loader stream {g} of {n_streams} found no samples in {self.cfg.shards!r}")
            drawn = 0
        if images and not self.cfg.train:
            yield self._collate(images, texts, keys, tokenizer, w, (0, index), skips)

    @staticmethod
    def _collate(images, texts, keys, tokenizer, worker, position, skips) -> dict:
        return {
            "image": torch.from_numpy(np.stack(images)),
            "text": torch.from_numpy(tokenizer(texts)),
            "key": list(keys),
            "worker": worker,
            "position": position,
            "skipped": dict(skips),
        }


class Loader:
    """Iterable over batches of one rank, with ``state_dict``/``load_state_dict`` for resume."""

    def __init__(self, cfg: StreamConfig) -> None:
        self.urls = list_shards(cfg.shards)  # fails here, in the main process, on a wrong spec or missing file
        self.cfg = cfg
        self.n_workers = max(1, cfg.workers)
        self.positions: list[tuple[int, int]] = [(0, 0)] * self.n_workers
        self.batches = 0
        self.skipped: Counter = Counter()
        self._identity = hashlib.sha256(json.dumps(
            {k: v for k, v in asdict(cfg).items() if k not in ("workers", "worker_timeout_s")}, sort_keys=True
        ).encode()).hexdigest()[:16]

    def __iter__(self) -> Iterator[dict]:
        dataset = ImageTextStream(self.cfg, list(self.positions), first_worker=self.batches % self.n_workers,
                                  urls=self.urls)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.workers,
            persistent_workers=False, prefetch_factor=4 if self.cfg.workers else None,
            pin_memory=torch.cuda.is_available(), timeout=self.cfg.worker_timeout_s if self.cfg.workers else 0,
        )
        for batch in loader:
            self.positions[batch["worker"]] = tuple(batch["position"])
            self.batches += 1
            self.skipped.update(batch["skipped"])
            yield batch

    def state_dict(self) -> dict:
        return {"batches": self.batches, "positions": [list(p) for p in self.positions],
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
            raise LoaderStateError("loader state was saved for different shards, batch size, seed or "
                                   "transforms; exact resume is impossible")
        self.positions = [tuple(p) for p in state["positions"]]
        self.batches = state["batches"]
        self.skipped = Counter(state.get("skipped", {}))
