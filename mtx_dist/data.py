"""Build the training and held-out loaders from the data config (generating demo shards if needed)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

from mtx_dist import faults

from mtx_data_pipelines.demo import DemoSpec, shard_spec, write_demo_split
from mtx_data_pipelines.loader import Loader, StreamConfig
from mtx_data_pipelines.sources import ShardSpecError
from mtx_data_pipelines.tokenizer import TEXT_PAD_MULTIPLE
from mtx_data_pipelines.transforms import normalize_images
from mtx_dist.config import Config, ConfigError


def _demo_spec(cfg: Config, split: str) -> DemoSpec:
    size = cfg.model.spec.vision.image_size
    px = max(size + size // 4, 32)  # a margin for random crops
    if split == "train":
        return DemoSpec("train", cfg.data.demo_train_samples, image_px=px, seed=cfg.run.seed)
    return DemoSpec("val", cfg.data.demo_val_samples, image_px=px, seed=cfg.run.seed, distinct=True)


def resolve_shards(cfg: Config, local_rank: int) -> tuple[str, str]:
    """Shard specs for training and held-out data; an empty key means generated demo shards."""
    import torch.distributed as dist

    specs = {"train": cfg.data.train, "val": cfg.data.val}
    demo = [split for split, spec in specs.items() if not spec]
    if not demo:
        return specs["train"], specs["val"]
    # One writer per node (the folder may or may not be shared between nodes); the others wait, then
    # find the finished split and reuse it (writes are atomic, see write_demo_split).
    def write() -> None:
        for split in demo:
            specs[split] = shard_spec(write_demo_split(cfg.data.demo_dir, _demo_spec(cfg, split)))

    if local_rank == 0:
        write()
    if dist.is_initialized():
        dist.barrier()
    if local_rank != 0:
        write()
    return specs["train"], specs["val"]


def worker_niceness(configured: int, device: str) -> int:
    """``data.worker_nice``, with -1 (auto) resolved: lowest priority on CPU runs, where the training step
    needs every core and a descheduled OpenMP thread stalls the step; the training process's own on
    GPU runs, where the step waits on the device and the workers are what the host's cores are for (at
    19 they would also starve behind any other process on the node)."""
    if configured >= 0:
        return configured
    return 19 if device == "cpu" else 0


def text_pad_multiple(cfg: Config) -> int:
    """What a trimmed batch's text length is rounded up to (0: no trimming, full context). Compiled
    models take multiples of 8, a few shapes to compile; eager ones the longest caption itself, since
    every token past it is work that changes nothing (the hard race set: 17-18 tokens, not 24)."""
    if not cfg.data.text_trim:
        return 0
    return TEXT_PAD_MULTIPLE if cfg.run.compile else 1


def build_loader(cfg: Config, shards: str, train: bool, rank: int, world_size: int, device: str = "cpu"):
    """The loader of one data-parallel rank: a :class:`Loader` (cpu backend) or a ``DaliLoader``."""
    spec = cfg.model.spec
    key = "data.train" if train else "data.val"
    stream = StreamConfig(
        shards=shards, batch_size=cfg.data.batch_size, image_size=spec.vision.image_size,
        context_length=spec.text.context_length, train=train, seed=cfg.run.seed,
        workers=cfg.data.workers if train else min(cfg.data.workers, 1),
        shuffle_buffer=cfg.data.shuffle_buffer, max_pixels=cfg.data.max_pixels, rank=rank,
        world_size=world_size, weights=cfg.data.train_weights if train else "", mode=cfg.data.mode,
        jpeg_draft=cfg.data.jpeg_draft, normalize=not train,  # training batches are normalized by DevicePrefetcher
        text_pad_multiple=text_pad_multiple(cfg),
        worker_nice=worker_niceness(cfg.data.worker_nice, device),
    )
    try:
        if cfg.data.backend == "dali" and train:  # held-out evaluation stays on the small, exact cpu path
            from mtx_data_pipelines.dali_loader import DaliLoader

            return DaliLoader(stream, device=device, index_dir=cfg.data.dali_index_dir)
        return Loader(stream, pin_memory=device == "cuda" and cfg.data.prefetch)
    except ImportError as e:  # the optional DALI extra
        raise ConfigError(f"config key 'data.backend' = 'dali': {e}; install nvidia-dali-cuda130 (or use cpu)") from None
    except ShardSpecError as e:
        raise ConfigError(f"config key '{key}' / 'data.train_weights': {e}") from None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key '{key}' = {shards!r}: {e}") from None


class DevicePrefetcher:
    """Batches of a loader with ``image``/``text`` on ``device``, uint8 images CLIP-normalized there. On
    CUDA the next batch is copied from pinned host memory on a side stream while the current step runs;
    elsewhere it passes through.

    Being one batch ahead, it keeps the loader state of the batches actually handed out:
    checkpoints must use this object's ``state_dict``/``skipped``, not the loader's."""

    def __init__(self, loader, device: torch.device, enabled: bool = True, rank: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        self.loader, self.device, self.rank = loader, device, rank
        self.dtype = dtype  # uint8 images are normalized into it here, once, on the device
        self.ahead = enabled and device.type == "cuda"
        self._state, self._skipped = loader.state_dict(), Counter(loader.skipped)

    def state_dict(self) -> dict:
        return self._state if self.ahead else self.loader.state_dict()

    @property
    def skipped(self) -> Counter:
        return self._skipped if self.ahead else self.loader.skipped

    def __iter__(self) -> Iterator[dict]:
        batches = _hang_injectable(iter(self.loader), self.rank)
        if not self.ahead:
            for batch in batches:
                if batch["image"].dtype == torch.uint8:
                    batch["image"] = normalize_images(batch["image"], self.dtype)
                yield batch
            return
        side = torch.cuda.Stream(self.device)

        def fetch() -> dict | None:
            batch = next(batches, None)
            if batch is not None:
                with torch.cuda.stream(side):
                    for k in ("image", "text"):
                        t = batch[k]
                        if t.device.type == "cpu" and not t.is_pinned():
                            t = t.pin_memory()
                        batch[k] = t.to(self.device, non_blocking=True)
                    if batch["image"].dtype == torch.uint8:
                        batch["image"] = normalize_images(batch["image"], self.dtype)
            return batch

        upcoming = fetch()
        while upcoming is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(side)
            batch = upcoming
            for k in ("image", "text"):
                batch[k].record_stream(main)  # allocated on the side stream, used on the main one
            self._state, self._skipped = self.loader.state_dict(), Counter(self.loader.skipped)
            upcoming = fetch()
            yield batch


def _hang_injectable(batches: Iterator[dict], rank: int) -> Iterator[dict]:
    """The loader's batches; with ``MTX_FAULTS=hang=loader:N[:rank]`` the N-th never comes (a loader that
    deadlocked, as seen by the training thread; for the hang-watchdog tests)."""
    for n, batch in enumerate(batches, 1):
        faults.hang("loader", n, rank)
        yield batch


def skipped_totals(skipped: Counter, group, dp_size: int, device: torch.device) -> dict[str, int]:
    """Skip counters of this rank summed over the data-parallel group (every rank must call it)."""
    from mtx_data_pipelines.loader import SKIP_REASONS

    counts = torch.tensor([skipped.get(r, 0) for r in SKIP_REASONS], dtype=torch.int64, device=device)
    if dp_size > 1:
        torch.distributed.all_reduce(counts, group=group)
    return dict(zip(SKIP_REASONS, counts.tolist()))


def record_keys(path: str, step: int, batch: dict) -> None:
    """Append the batch's sample keys (and epochs) as one JSON line: a debugging aid for checking
    which samples a run saw (``MTX_RECORD_KEYS=path``)."""
    import json

    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "key": list(batch["key"]), "epoch": list(batch.get("epoch", [])),
                            "skipped_by_epoch": batch.get("skipped_by_epoch", [])}) + "\n")
