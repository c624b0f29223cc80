"""Data sets of ``bench/bench_race.py``: the demo shards, and a harder two-object set.

``demo``: the shards ``mtx-dist train`` generates (``mtx_data_pipelines.demo``: one shape, colour, size
and position per image); held-out pools of all 240 distinct scenes (the quickstart holds out 128).

``hard``: two objects per image, each one of five shapes in one of the six demo colours, side by side
or one above the other; the caption names both objects and their relation, in either order
("a red circle to the left of a blue star", "a blue star to the right of a red circle"). Swapping
colours or sides gives another scene, so matching needs the binding of colour to shape and of both to
place, not a bag of words. 30 objects x 29 x 2 relations = 1740 scenes; a held-out pool holds
distinct scenes only (no two of its captions describe the same picture), rendered with other noise.

Both are ordinary WebDataset tars (``KEY.jpg``, ``KEY.txt``, ``KEY.json``), cached by a fingerprint
of their parameters.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from mtx_data_pipelines.demo import COLORS, DemoSpec, shard_spec, write_demo_split
from mtx_data_pipelines.writer.sink import ShardSink, brace_spec

HARD_SHAPES = ("circle", "square", "triangle", "star", "hexagon")
OBJECTS = list(itertools.product(HARD_SHAPES, COLORS))
RELATIONS = ("horizontal", "vertical")  # first object left of / above the second
HARD_SCENES = [(a, b, rel) for a, b in itertools.permutations(OBJECTS, 2) for rel in RELATIONS]
TEMPLATES = {
    "horizontal": ("a {a} to the left of a {b}", "a {b} to the right of a {a}", "left: a {a}; right: a {b}",
                   "a photo of a {a} next to a {b} on its right"),
    "vertical": ("a {a} above a {b}", "a {b} below a {a}", "top: a {a}; bottom: a {b}",
                 "a photo of a {a} with a {b} underneath"),
}
# Polygon vertices on the unit circle (angle in turns, radius factor); the circle is drawn as an ellipse.
_POLYGONS = {
    "square": [(0.125 + i / 4, 1.0) for i in range(4)],
    "triangle": [(0.75 + i / 3, 1.0) for i in range(3)],  # apex up (y grows downwards)
    "hexagon": [(i / 6, 1.0) for i in range(6)],
    "star": [(0.75 + i / 10, 1.0 if i % 2 == 0 else 0.45) for i in range(10)],
}


@dataclass(frozen=True)
class HardSpec:
    split: str
    num_samples: int
    image_px: int = 80
    seed: int = 0
    distinct: bool = False
    samples_per_shard: int = 1024

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps({"v": 1, **asdict(self)}, sort_keys=True).encode()).hexdigest()[:16]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    draw.polygon([(cx + r * f * math.cos(2 * math.pi * t), cy + r * f * math.sin(2 * math.pi * t))
                  for t, f in _POLYGONS[shape]], fill=fill)


def render_hard(a: tuple[str, str], b: tuple[str, str], relation: str, px: int, rng: np.random.Generator) -> Image.Image:
    base = rng.integers(30, 110, size=3)
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, (px, px, 3)), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    along = rng.uniform(0.22, 0.32), rng.uniform(0.68, 0.78)  # the two centres along the relation's axis
    across = rng.uniform(0.35, 0.65, 2)  # free placement across it
    for (shape, color), u, v in zip((a, b), along, across):
        cx, cy = (u, v) if relation == "horizontal" else (v, u)
        fill = tuple(int(c) for c in np.clip(np.array(COLORS[color]) + rng.integers(-20, 21, 3), 0, 255))
        _draw(draw, shape, cx * px, cy * px, px * 0.15 * rng.uniform(0.9, 1.1), fill)
    return img


def hard_caption(a: tuple[str, str], b: tuple[str, str], relation: str, template: int) -> str:
    (shape_a, color_a), (shape_b, color_b) = a, b
    return TEMPLATES[relation][template].format(a=f"{color_a} {shape_a}", b=f"{color_b} {shape_b}")


def write_hard_split(out_dir: str, spec: HardSpec) -> str:
    """Write (or reuse) one split; returns its shard spec."""
    manifest_path = os.path.join(out_dir, f"{spec.split}.manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") == spec.fingerprint():
            return manifest["spec"]
    if spec.distinct and spec.num_samples > len(HARD_SCENES):
        raise ValueError(f"at most {len(HARD_SCENES)} distinct scenes; asked for {spec.num_samples}")
    rng = np.random.default_rng([spec.seed, sum(spec.split.encode()), 7])
    picks = (rng.permutation(len(HARD_SCENES))[: spec.num_samples] if spec.distinct
             else rng.integers(0, len(HARD_SCENES), spec.num_samples))
    staging = os.path.join(out_dir, f".{spec.split}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    sink = ShardSink(staging, spec.split, spec.samples_per_shard, max_shard_bytes=1 << 40)
    for i, pick in enumerate(picks):
        a, b, relation = HARD_SCENES[pick]
        buf = io.BytesIO()
        render_hard(a, b, relation, spec.image_px, rng).save(buf, format="JPEG", quality=90)
        text = hard_caption(a, b, relation, int(rng.integers(len(TEMPLATES[relation]))))
        sink.write(f"{spec.split}-{i:08d}", {"jpg": buf.getvalue(), "txt": text.encode(),
                                             "json": json.dumps({"a": a, "b": b, "relation": relation}).encode()})
    records = sink.close()
    for name in os.listdir(staging):  # shards (and their DALI indices) into place, manifest last
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)
    shards = brace_spec(os.path.join(os.path.abspath(out_dir), r["name"]) for r in records)
    with open(manifest_path + ".tmp", "w") as f:
        json.dump({"fingerprint": spec.fingerprint(), "spec": shards, "shards": records}, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    return shards


def demo_px(image_size: int) -> int:
    return max(image_size + image_size // 4, 32)  # as mtx_dist.data: a margin for random crops


def make_dataset(name: str, root: str, image_size: int, train_samples: int, pool_size: int, pools: int
                 ) -> tuple[str, list[str]]:
    """Shard specs of data set ``name`` under ``root/name``: the training split, and ``pools`` held-out
    pools of ``pool_size`` distinct scenes each (other renderings and phrasings in every pool). Retrieval
    is scored within a pool, where no two captions describe the same scene; several pools average out
    the noise of a small one."""
    out, px = os.path.join(root, name), demo_px(image_size)
    os.makedirs(out, exist_ok=True)
    if name == "demo":
        train = shard_spec(write_demo_split(out, DemoSpec("train", train_samples, image_px=px)))
        return train, [shard_spec(write_demo_split(out, DemoSpec(f"val{i}", pool_size, image_px=px, distinct=True)))
                       for i in range(pools)]
    if name == "hard":
        train = write_hard_split(out, HardSpec("train", train_samples, image_px=px))
        return train, [write_hard_split(out, HardSpec(f"val{i}", pool_size, image_px=px, distinct=True))
                       for i in range(pools)]
    raise ValueError(f"unknown data set {name!r}: demo or hard")
