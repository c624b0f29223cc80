"""MLflow's request settings for our own calls only.

MLflow's REST client retries a failed request 7 times with exponential backoff and waits up to
120 s for an answer: minutes of stalled delivery per call, and at the end of training minutes of a
stalled exit. Our guard retries instead. MLflow reads both settings from the environment at every
request and has no per-client setting, so they are set only while one of our calls runs and
restored afterwards: a process that embeds the trainer keeps its own MLflow settings. (Another
thread's MLflow request that overlaps one of ours in time sees ours: the environment is the
process's.)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

_LOCK = threading.Lock()  # guards the count and the saved values, never held across a request
_active = {"count": 0, "saved": {}}


@contextlib.contextmanager
def request_policy(timeout_s: float):
    """Within the block: MLflow requests are not retried and time out after ``timeout_s`` (whole
    seconds: MLflow reads the variable as an integer). Scopes may overlap, on one thread or several:
    the first to enter sets the variables, the last to leave restores the process's values, and no
    lock is held while a request runs."""
    ours = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s)))}
    with _LOCK:
        if _active["count"] == 0:
            _active["saved"] = {k: os.environ.get(k) for k in ours}
            os.environ.update(ours)
        _active["count"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _active["count"] -= 1
            if _active["count"] == 0:
                for k, v in _active["saved"].items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


class ScopedClient:
    """An ``MlflowClient`` whose every method call runs under :func:`request_policy`."""

    def __init__(self, client, timeout_s: float) -> None:
        self._inner, self._timeout_s = client, timeout_s

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            with request_policy(self._timeout_s):
                return attr(*args, **kwargs)
        return call
