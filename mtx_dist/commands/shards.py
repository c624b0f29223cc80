"""``mtx-dist shards``: write WebDataset shards."""

from __future__ import annotations

import argparse

from mtx_dist.config import ConfigError


def _run(args: argparse.Namespace) -> int:
    from data_pipelines.demo import DemoSpec, shard_spec, write_demo_split

    if args.input != "demo":
        raise ConfigError(f"--input {args.input!r}: only 'demo' is supported by this version")
    paths = write_demo_split(args.output, DemoSpec(args.split, args.samples, args.per_shard, args.image_px,
                                                   args.seed, distinct=args.distinct))
    print(f"wrote {args.samples} samples in {len(paths)} shards: {shard_spec(paths)}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("shards", help="write WebDataset shards (demo data)")
    s.add_argument("--input", default="demo", help="source of samples ('demo': generated shapes)")
    s.add_argument("--output", required=True, help="output directory")
    s.add_argument("--split", default="train")
    s.add_argument("--samples", type=int, default=4096)
    s.add_argument("--per-shard", type=int, default=1024)
    s.add_argument("--image-px", type=int, default=80)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--distinct", action="store_true", help="every sample a different scene")
    s.set_defaults(func=_run)
