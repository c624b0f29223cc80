"""User-facing errors: input the user can fix (a config key, a path, a file's content, a launch
variable). The CLI prints one of these as one line and exits with code 2; anything else is a bug
and keeps its traceback.

Engine errors subclass :class:`UserError`. The leaf packages (``launchers``, ``data_pipelines``) may
not import ``mtx_dist``; their errors of the same kind are named once, in :func:`user_errors`.
"""

from __future__ import annotations


class UserError(Exception):
    """Wrong input. ``label`` is how the CLI introduces it (default: the class name)."""

    label = ""


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps skipped for non-finite values (the CLI's exit code 3)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Every error type the CLI reports as one line with exit code 2."""
    from mtx_data_pipelines.dali_index import DaliIndexError
    from mtx_data_pipelines.writer.errors import ShardWriterError
    from mtx_launchers.env import LaunchEnvError  # HostfileError and RendezvousError are kinds of it

    return UserError, LaunchEnvError, ShardWriterError, DaliIndexError


def describe(e: BaseException) -> str:
    """``label: message`` for the CLI's one line."""
    return f"{getattr(e, 'label', '') or type(e).__name__}: {e}"
