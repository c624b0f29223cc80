"""The tests run ranks with :func:`launchers.local.run_ranks`."""

from launchers.local import run_ranks  # noqa: F401
