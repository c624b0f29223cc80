"""A real ``mlflow server`` for tests: sqlite backend, proxied artifacts, its own process group,
started and stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from launchers.env import free_port

START_TIMEOUT_S = 120


class MlflowServer:
    """``mlflow server`` on a loopback port in its own process group; restartable on the same port and DB."""

    def __init__(self, root: str) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        self.log = open(os.path.join(self.root, "server.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", f"{self.root}/artifacts"],
            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server gave no /health in {START_TIMEOUT_S} s: {self._log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the server and its worker processes
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        except ProcessLookupError:  # the group is gone already
            pass
        self.proc = None
        self.log.close()

    def ensure(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.stop()  # exited by itself: reap its group, close the log
        if self.proc is None:
            self.start()

    def _log_tail(self) -> str:
        with open(os.path.join(self.root, "server.log"), "rb") as f:
            return f.read()[-2000:].decode(errors="replace")
