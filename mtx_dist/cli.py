"""``mtx-dist`` command line: ``train``, ``shards``, ``eval``.

Heavy imports (torch, deepspeed, mlflow) happen inside the subcommands, after the configuration
has been validated, so a bad key fails in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mtx_dist.checkpoint import CheckpointError
from mtx_dist.config import ConfigError, describe, load_config
from mtx_dist.optim import TrainingDiverged

DEFAULT_CONFIG_HELP = "defaults = configs/tiny-cpu.toml (a CPU quickstart on generated demo shards)"


def _train(args: argparse.Namespace) -> int:
    if args.help_config:
        print(describe())
        return 0
    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config and not config.endswith(".toml"):
        overrides.insert(0, config)  # `mtx-dist train run.steps=5`: no config file given
        config = None
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(config, overrides)  # raises ConfigError before anything starts

    from mtx_dist.trainer import train
    train(cfg)
    return 0


def _shards(args: argparse.Namespace) -> int:
    from data_pipelines.demo import DemoSpec, shard_spec, write_demo_split

    if args.input != "demo":
        raise ConfigError(f"--input {args.input!r}: only 'demo' is supported by this version")
    paths = write_demo_split(args.output, DemoSpec(args.split, args.samples, args.per_shard, args.image_px,
                                                   args.seed, distinct=args.distinct))
    print(f"wrote {args.samples} samples in {len(paths)} shards: {shard_spec(paths)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtx-dist", description="Contrastive pretraining of a Meta-Transformer "
                                "shared encoder: WebDataset shards -> DeepSpeed -> frozen export.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # The deepspeed launcher passes --local_rank=N first; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain (no arguments: CPU quickstart on demo shards)",
                       description=f"Train. {DEFAULT_CONFIG_HELP}. Override any key with section.key=value.")
    t.add_argument("config", nargs="?", help="TOML config file (optional)")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")
    t.add_argument("--resume", metavar="latest|TAG", help="continue from a checkpoint of run.dir "
                   "('latest' starts fresh when there is none)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default")
    t.set_defaults(func=_train)

    s = sub.add_parser("shards", help="write WebDataset shards (demo data)")
    s.add_argument("--input", default="demo", help="source of samples ('demo': generated shapes)")
    s.add_argument("--output", required=True, help="output directory")
    s.add_argument("--split", default="train")
    s.add_argument("--samples", type=int, default=4096)
    s.add_argument("--per-shard", type=int, default=1024)
    s.add_argument("--image-px", type=int, default=80)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--distinct", action="store_true", help="every sample a different scene")
    s.set_defaults(func=_shards)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mtx-dist: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"mtx-dist: checkpoint error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"mtx-dist: training stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
