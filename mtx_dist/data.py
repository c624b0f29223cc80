"""Build the training and held-out loaders from the data config (generating demo shards if needed)."""

from __future__ import annotations

from data_pipelines.demo import DemoSpec, shard_spec, write_demo_split
from data_pipelines.loader import Loader, StreamConfig
from mtx_dist.config import Config
from mtx_dist.models.presets import get_preset


def demo_shards(cfg: Config, rank: int) -> tuple[str, str]:
    """Shard specs of the demo splits, generated once by rank 0 (others wait on the barrier)."""
    import torch.distributed as dist

    d = cfg.data
    spec = get_preset(cfg.model.preset)
    px = max(spec.vision.image_size + spec.vision.image_size // 4, 32)  # a margin for random crops
    splits = (DemoSpec("train", d.demo_train_samples, image_px=px, seed=cfg.run.seed),
              DemoSpec("val", d.demo_val_samples, image_px=px, seed=cfg.run.seed, distinct=True))
    if rank == 0:
        paths = [write_demo_split(d.demo_dir, s) for s in splits]
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        paths = [write_demo_split(d.demo_dir, s) for s in splits]  # reuses the files rank 0 wrote
    return shard_spec(paths[0]), shard_spec(paths[1])


def resolve_shards(cfg: Config, rank: int) -> tuple[str, str]:
    train, val = cfg.data.train, cfg.data.val
    if not train or not val:
        demo_train, demo_val = demo_shards(cfg, rank)
        train, val = train or demo_train, val or demo_val
    return train, val


def build_loader(cfg: Config, shards: str, train: bool, rank: int, world_size: int) -> Loader:
    spec = get_preset(cfg.model.preset)
    return Loader(StreamConfig(
        shards=shards, batch_size=cfg.data.batch_size, image_size=spec.vision.image_size,
        context_length=spec.text.context_length, train=train, seed=cfg.run.seed,
        workers=cfg.data.workers if train else min(cfg.data.workers, 1),
        shuffle_buffer=cfg.data.shuffle_buffer, max_pixels=cfg.data.max_pixels, rank=rank,
        world_size=world_size,
    ))
