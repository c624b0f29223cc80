"""``mtx-dist`` command line; the subcommands live in :mod:`mtx_dist.commands`.

Heavy imports (torch, deepspeed, mlflow) happen inside the subcommands, after the configuration
has been validated, so a bad key fails in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mtx_dist.commands import register_all
from mtx_dist.errors import TrainingDiverged, describe, user_errors

TRAINING_STOPPED = 3  # exit code of a run stopped for repeated non-finite steps (optim.max_skipped_steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtx-dist", description="Contrastive pretraining of a Meta-Transformer "
                                "shared encoder: WebDataset shards -> DeepSpeed -> frozen export.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # The deepspeed launcher passes --local_rank=N first; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    register_all(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except Exception as e:
        if isinstance(e, TrainingDiverged):
            print(f"mtx-dist: training stopped: {e}", file=sys.stderr)
            return TRAINING_STOPPED
        if isinstance(e, user_errors()):  # wrong input: one line, no traceback
            print(f"mtx-dist {args.command}: {describe(e)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
