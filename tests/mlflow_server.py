"""A real ``mlflow server`` for tests: sqlite backend, proxied artifacts, its own process group,
started and stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from mtx_launchers.env import free_port

START_TIMEOUT_S = 120


def wait_until_answering(url: str, proc: subprocess.Popen, timeout_s: float, log_tail=lambda: "") -> None:
    """Until ``url`` answers 200; RuntimeError if ``proc`` exits first, TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}: {log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s: {log_tail()}")


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
        try:
            wait_until_answering(f"{self.url}/health", self.proc, START_TIMEOUT_S, self._log_tail)
        except TimeoutError:
            self.stop()
            raise

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


class GatedProxy:
    """An HTTP proxy in front of a server that holds every request while its gate is closed: a store
    that is live but slow, as slow as the test wants. ``held`` counts requests waiting at the gate."""

    def __init__(self, upstream: str, hold_limit_s: float = 240.0) -> None:
        import http.server
        import threading

        self.upstream, self.gate, self.held = upstream.rstrip("/"), threading.Event(), 0
        self.gate.set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                proxy.held += 1
                proxy.gate.wait(hold_limit_s)
                proxy.held -= 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                             headers={k: v for k, v in self.headers.items()
                                                      if k.lower() in ("content-type", "accept")})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, payload, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
                except urllib.error.HTTPError as e:
                    status, payload, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
