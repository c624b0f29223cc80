"""Samples/s of the training data path on the same shards and worker count, in one run.

Variants (all: read -> decode -> random resized crop (scale 0.9-1, bicubic) -> CLIP normalize ->
tokenize -> batches of ``--batch``, ``--workers`` loader processes or threads):
  plain       a webdataset + PIL loop shaped like OpenCLIP's ``get_wds_dataset``: wds.WebDataset ->
              shuffle -> decode("pilrgb") -> to_tuple -> map (a torchvision-like transform written
              with PIL, per-sample tokenization) -> batched -> WebLoader
  cpu-float   our Loader with float images normalized in the workers (as evaluation uses it)
  cpu         our Loader as the trainer uses it: uint8 images from the workers, normalized in batch
              afterwards (here in this process, on the GPU when training there)
  cpu+draft   the same with data.jpeg_draft=true (libjpeg decodes JPEGs with a shorter side of at
              least twice the needed size at a reduced scale; no effect on smaller images)
  dali-cpu    our DaliLoader with device_id=None (CPU threads)
  dali-gpu    our DaliLoader decoding on the GPU (only when CUDA is available)

Shards of ``--samples`` JPEGs (``--min-px``..``--max-px`` a side, photo-like content, quality 90) are
generated once into ``--dir``. Each variant is timed over ``--batches`` batches after ``--warmup``,
``--rounds`` times in turn (best kept: other work on a shared machine only ever slows a round);
the ratio columns are over the plain loop's, measured in this run. Samples per CPU-second (this
process and its loader workers) is the cost per sample, robust to other load on a shared machine;
on dedicated cores, wall throughput follows it once the workers keep the cores busy.

    PYTHONPATH=. python bench/bench_data.py [--samples 1024] [--shards 8] [--workers 2] [--batch 64]
                                            [--size 224] [--min-px 256] [--max-px 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mtx_data_pipelines.loader import Loader, StreamConfig
from mtx_data_pipelines.tokenizer import ClipTokenizer
from mtx_data_pipelines.transforms import normalize_images, random_resized_crop_box, to_normalized_chw


def make_shards(d: str, samples: int, shards: int, min_px: int, max_px: int) -> str:
    spec = f"{d}/bench-{{000000..{shards - 1:06d}}}.tar"
    done = os.path.join(d, f"done-{samples}-{shards}-{min_px}-{max_px}")
    if os.path.exists(done):
        return spec
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    per = -(-samples // shards)
    for s in range(shards):
        with wds.TarWriter(os.path.join(d, f"bench-{s:06d}.tar")) as sink:
            for i in range(s * per, min(samples, (s + 1) * per)):
                w, h = (int(x) for x in rng.integers(min_px, max_px + 1, 2))
                y, x = np.mgrid[0:h, 0:w]
                img = np.stack([128 + 90 * np.sin(x / rng.uniform(5, 40) + i), 128 + 90 * np.cos(y / rng.uniform(5, 40)),
                                (x * 255 // w + y * 255 // h) // 2], -1) + rng.normal(0, 8, (h, w, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"b{i:07d}", "jpg": buf.getvalue(),
                            "txt": f"a photo number {i} of a striped gradient pattern".encode()})
    open(done, "w").close()
    return spec


class PlainTransform:
    """torchvision's RandomResizedCrop(size, scale=(0.9, 1), bicubic) + ToTensor + Normalize, with PIL."""

    def __init__(self, size: int) -> None:
        self.size, self.rng = size, np.random.default_rng()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        left, top, w, h = random_resized_crop_box(img.width, img.height, self.rng)
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)
        return torch.from_numpy(to_normalized_chw(img))


def plain_loader(spec: str, workers: int, batch: int, size: int, context: int):
    tokenizer = ClipTokenizer(context_length=context)
    dataset = (wds.WebDataset(spec, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node)
               .shuffle(1000)
               .decode("pilrgb")
               .to_tuple("jpg", "txt")
               .map_tuple(PlainTransform(size), lambda t: torch.from_numpy(tokenizer([t])[0]))
               .batched(batch))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def _cpu_seconds() -> float:
    """CPU time of this process (DALI's threads included) and its live children (loader workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def measure(loader, warmup: int, batches: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second) in the steady state after ``warmup``."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
    for _ in range(batches):
        b = next(it)
        img = b[0] if isinstance(b, (list, tuple)) else b["image"]
        if img.dtype == torch.uint8:
            img = normalize_images(img)
        n += img.shape[0]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    del it  # stops the workers before the next variant starts
    return n / wall, n / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/mtx-bench-data")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--context", type=int, default=77)
    ap.add_argument("--min-px", type=int, default=256)
    ap.add_argument("--max-px", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    spec = make_shards(args.dir, args.samples, args.shards, args.min_px, args.max_px)
    cfg = StreamConfig(spec, args.batch, args.size, args.context, train=True, workers=args.workers,
                       shuffle_buffer=1000)
    variants = {
        "plain": lambda: plain_loader(spec, args.workers, args.batch, args.size, args.context),
        "cpu-float": lambda: Loader(cfg),
        "cpu": lambda: Loader(StreamConfig(**{**cfg.__dict__, "normalize": False})),
        "cpu+draft": lambda: Loader(StreamConfig(**{**cfg.__dict__, "normalize": False, "jpeg_draft": True})),
    }
    try:
        from mtx_data_pipelines.dali_loader import DaliLoader

        index_dir = os.path.join(args.dir, "dali-index")
        variants["dali-cpu"] = lambda: DaliLoader(cfg, device="cpu", index_dir=index_dir, threads=args.workers)
        if torch.cuda.is_available():
            variants["dali-gpu"] = lambda: DaliLoader(cfg, device="cuda", index_dir=index_dir, threads=args.workers)
    except ImportError as e:  # the optional extra is missing: say so in the table
        print(f"dali variants left out: {e}")

    wall: dict[str, float] = {}
    per_cpu: dict[str, float] = {}
    for r in range(args.rounds):
        for name, build in variants.items():
            sps, spc = measure(build(), args.warmup, args.batches)
            wall[name], per_cpu[name] = max(wall.get(name, 0.0), sps), max(per_cpu.get(name, 0.0), spc)
            print(f"  round {r + 1} {name:10s} {sps:8.1f} samples/s {spc:8.1f} samples/CPU-s", flush=True)
    print(f"\n{args.samples} JPEGs {args.min_px}-{args.max_px} px -> {args.size} px, batch {args.batch}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs, best of {args.rounds} rounds")
    print(f"{'variant':12s} {'samples/s':>10s} {'vs plain':>9s} {'samples/CPU-s':>14s} {'vs plain':>9s}")
    for name in wall:
        print(f"{name:12s} {wall[name]:10.1f} {wall[name] / wall['plain']:8.2f}x {per_cpu[name]:14.1f} "
              f"{per_cpu[name] / per_cpu['plain']:8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "samples_per_s": wall, "samples_per_cpu_s": per_cpu}, f, indent=1)


if __name__ == "__main__":
    main()
