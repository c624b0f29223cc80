"""One module per ``mtx-dist`` subcommand; each defines ``register(subparsers)``.

A module adds its parser and sets ``func`` (called with the parsed arguments, returning the exit
code). Heavy imports happen inside ``func``, so ``mtx-dist --help`` and config errors stay fast.
Wrong input raises a :class:`mtx_dist.errors.UserError` (or a leaf error named in
:func:`mtx_dist.errors.user_errors`): the CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import importlib

COMMANDS = ("train", "shards", "export", "adapt", "eval", "launch", "verify", "plan")


def register_all(sub) -> None:
    """Add every subcommand's parser."""
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"mtx_dist.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"mtx_dist.commands.{name}":
                raise
            continue  # not part of this build
        module.register(sub)
