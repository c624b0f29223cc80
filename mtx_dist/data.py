"""Build the training and held-out loaders from the data config (generating demo shards if needed)."""

from __future__ import annotations

from data_pipelines.demo import DemoSpec, shard_spec, write_demo_split
from data_pipelines.loader import Loader, StreamConfig
from mtx_dist.config import Config, ConfigError
from mtx_dist.models.presets import get_preset


def _demo_spec(cfg: Config, split: str) -> DemoSpec:
    size = get_preset(cfg.model.preset).vision.image_size
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


def build_loader(cfg: Config, shards: str, train: bool, rank: int, world_size: int) -> Loader:
    spec = get_preset(cfg.model.preset)
    try:
        return Loader(StreamConfig(
            shards=shards, batch_size=cfg.data.batch_size, image_size=spec.vision.image_size,
            context_length=spec.text.context_length, train=train, seed=cfg.run.seed,
            workers=cfg.data.workers if train else min(cfg.data.workers, 1),
            shuffle_buffer=cfg.data.shuffle_buffer, max_pixels=cfg.data.max_pixels, rank=rank,
            world_size=world_size,
        ))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key '{'data.train' if train else 'data.val'}' = {shards!r}: {e}") from None
