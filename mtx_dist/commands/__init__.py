"""One module per ``mtx-dist`` subcommand; each defines ``register(subparsers)``.

A module adds its parser and sets ``func`` (called with the parsed arguments, returning the exit
code). Heavy imports happen inside ``func``, so ``mtx-dist --help`` and config errors stay fast.
A module may list in ``ERRORS`` the exception types that mean "the user's input is wrong": the CLI
prints those as one line and exits 2 instead of showing a traceback.
"""

from __future__ import annotations

import importlib

COMMANDS = ("train", "shards", "export", "adapt", "eval", "launch", "verify")


def register_all(sub) -> tuple[type[BaseException], ...]:
    """Add every subcommand's parser; returns the user-error types they declare."""
    errors: list[type[BaseException]] = []
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"mtx_dist.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"mtx_dist.commands.{name}":
                raise
            continue  # not part of this build
        module.register(sub)
        errors.extend(getattr(module, "ERRORS", ()))
    return tuple(errors)
