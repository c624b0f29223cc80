"""``mtx-dist`` command line; the subcommands live in :mod:`mtx_dist.commands`.

Heavy imports (torch, deepspeed, mlflow) happen inside the subcommands, after the configuration
has been validated, so a bad key fails in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mtx_dist.checkpoint import CheckpointError
from mtx_dist.commands import register_all
from mtx_dist.config import ConfigError
from mtx_dist.optim import TrainingDiverged


USER_ERRORS: tuple[type[BaseException], ...] = ()


def build_parser() -> argparse.ArgumentParser:
    global USER_ERRORS
    p = argparse.ArgumentParser(prog="mtx-dist", description="Contrastive pretraining of a Meta-Transformer "
                                "shared encoder: WebDataset shards -> DeepSpeed -> frozen export.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # The deepspeed launcher passes --local_rank=N first; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    USER_ERRORS = register_all(sub)
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
    except USER_ERRORS as e:
        print(f"mtx-dist {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"mtx-dist: training stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
