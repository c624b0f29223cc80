"""The tests run ranks with :func:`mtx_launchers.local.run_ranks`."""

from mtx_launchers.local import run_ranks  # noqa: F401
