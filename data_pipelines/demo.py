"""Synthetic image-caption shards with a learnable relation between image and text.

Each image shows one shape of some colour and size at some position on a noisy background; its
caption describes exactly those attributes in one of several phrasings. A contrastive model must
read shape, colour, size and position from pixels to match captions, so held-out retrieval measures
real learning. Shards are ordinary WebDataset tars (``KEY.jpg``, ``KEY.txt``, ``KEY.json``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from mtx_data_pipelines.files import atomic_open, sha256_file

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 50, 200), "white": (245, 245, 245),
}
POSITIONS = {  # caption phrase -> centre as a fraction of the image side
    "top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72), "center": (0.5, 0.5),
}
SIZES = {"small": 0.14, "large": 0.26}  # radius as a fraction of the image side
TEMPLATES = (
    "a {size} {color} {shape} in the {position}",
    "a photo of a {size} {color} {shape}, {position}",
    "{position}: one {size} {color} {shape}",
    "there is a {color} {shape} in the {position}, and it is {size}",
)
COMBINATIONS = list(itertools.product(SHAPES, COLORS, POSITIONS, SIZES))  # 240 distinct scenes


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines the bytes of a demo split."""

    split: str
    num_samples: int
    samples_per_shard: int = 1024
    image_px: int = 80
    seed: int = 0
    distinct: bool = False  # every sample a different scene (for retrieval evaluation)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def render(shape: str, color: str, position: str, size: str, px: int, rng: np.random.Generator) -> Image.Image:
    """Draw one scene with jittered geometry on a noisy background."""
    base = rng.integers(30, 110, size=3)
    noise = rng.normal(0, 12, size=(px, px, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    cx, cy = (np.array(POSITIONS[position]) + rng.uniform(-0.05, 0.05, 2)) * px
    r = SIZES[size] * px * rng.uniform(0.9, 1.1)
    fill = tuple(int(c) for c in np.clip(np.array(COLORS[color]) + rng.integers(-20, 21, 3), 0, 255))
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def caption(shape: str, color: str, position: str, size: str, template: int) -> str:
    return TEMPLATES[template].format(shape=shape, color=color, position=position, size=size)


def write_demo_split(out_dir: str, spec: DemoSpec) -> list[str]:
    """Write (or reuse, when already written with the same spec) the shards of one split."""
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, f"{spec.split}.manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        shards = [os.path.join(out_dir, s["name"]) for s in manifest["shards"]]
        if manifest.get("fingerprint") == spec.fingerprint() and all(map(os.path.exists, shards)):
            return shards
    if spec.distinct and spec.num_samples > len(COMBINATIONS):
        raise ValueError(f"at most {len(COMBINATIONS)} distinct demo scenes; asked for {spec.num_samples}")

    rng = np.random.default_rng([spec.seed, sum(spec.split.encode())])
    if spec.distinct:
        scenes = [COMBINATIONS[i] for i in rng.permutation(len(COMBINATIONS))[: spec.num_samples]]
    else:
        scenes = [COMBINATIONS[i] for i in rng.integers(0, len(COMBINATIONS), spec.num_samples)]

    # Written into a private folder and moved into place shard by shard, manifest last: several
    # processes (one per node, say) may generate the same split at once and readers never see a
    # half-written shard. Fixed mtime: the same spec gives the same bytes whenever it is written.
    staging = tempfile.mkdtemp(prefix=f".{spec.split}-", dir=out_dir)
    pattern = os.path.join(staging, f"{spec.split}-%06d.tar")
    counts: list[int] = []
    with wds.ShardWriter(pattern, maxcount=spec.samples_per_shard, verbose=0, mtime=0) as sink:
        for i, scene in enumerate(scenes):
            img = render(*scene, px=spec.image_px, rng=rng)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            attrs = dict(zip(("shape", "color", "position", "size"), scene))
            sink.write({
                "__key__": f"{spec.split}-{i:08d}",
                "jpg": buf.getvalue(),
                "txt": caption(*scene, template=int(rng.integers(len(TEMPLATES)))),
                "json": json.dumps(attrs),
            })
            if i % spec.samples_per_shard == 0:
                counts.append(0)
            counts[-1] += 1
    shards = [os.path.join(out_dir, os.path.basename(pattern % i)) for i in range(len(counts))]
    for i, final in enumerate(shards):
        os.replace(pattern % i, final)
    os.rmdir(staging)
    manifest = {
        "fingerprint": spec.fingerprint(), "spec": asdict(spec),
        "shards": [{"name": os.path.basename(p), "samples": n, "bytes": os.path.getsize(p), "sha256": sha256_file(p)}
                   for p, n in zip(shards, counts)],
    }
    with atomic_open(manifest_path) as f:
        json.dump(manifest, f, indent=1)
    return shards


def shard_spec(shards: list[str]) -> str:
    """A brace-list shard spec for consecutive shards ``prefix-000000.tar .. prefix-00000N.tar``."""
    if len(shards) == 1:
        return shards[0]
    first, last = shards[0], shards[-1]
    return f"{first[:-10]}{{{first[-10:-4]}..{last[-10:-4]}}}.tar"
