"""The hang watchdog: a rank on which no training step completes in time writes the Python stacks of
all its threads and leaves with :data:`HANG_EXIT_CODE`, so the job ends (and, under SLURM, is
requeued) instead of idling the allocation until its time limit.

A dead rank already ends collectives (gloo and NCCL raise); what this catches is a rank that is alive
but stuck outside them -- a filesystem that stopped answering, a deadlocked loader, a Python-level
hang -- and the ranks waiting for it inside a collective. Every rank runs one daemon thread. The
trainer calls :meth:`HangWatchdog.beat` after each step and when it enters a phase that is allowed to
take longer (the first step, with compilation and loader start-up; checkpoints; evaluation; export).

The limit for a step is ``run.hang_timeout_s``, or with 0 (auto) ``MULTIPLE`` times the median step
time so far, at least ``FLOOR_S`` and at most ``COLLECTIVE_SHARE`` of the collective timeout
(``parallel.dist_timeout_s``: the ranks waiting for a hung one sit in a collective, and the watchdog
must fire before that times out). The long phases get at least ``LONG_PHASE_S``, uncapped (every rank
may be busy there: compiling, writing); a hang in one of them usually ends with the waiting ranks'
collective timeout instead (exit 1, no stack file), and ``run.compile`` gives every step at least
``LONG_PHASE_S`` (a new shape recompiles inside an ordinary step). When it fires, the
rank writes ``<run.dir>/hang-rank<N>.txt`` (what it was doing, then ``faulthandler``'s stacks of every
thread), runs the ``on_hang`` callback (rank 0: the file to MLflow, ``scontrol requeue`` under SLURM),
waits ``GRACE_S`` so the other ranks, which see the same stall, write theirs, and exits.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 76  # 75 is a preemption; both mean "restart from the last checkpoint"
FLOOR_S = 300.0
COLLECTIVE_SHARE = 0.8
MULTIPLE = 20.0
LONG_PHASE_S = 3600.0
LONG_PHASES = ("first step", "checkpoint", "evaluation", "export")
GRACE_S = 10.0
CALLBACK_LIMIT_S = 60.0  # the on_hang callback (network calls) gets this long, then the rank leaves anyway


def _clock() -> float:
    """Monotonic seconds (one place, so tests can stand in for the clock)."""
    return time.monotonic()


def hang_file(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"hang-rank{rank}.txt")


class HangWatchdog:
    """``timeout_s`` > 0: a fixed limit per step; 0: automatic (see the module docstring)."""

    def __init__(self, run_dir: str, rank: int, timeout_s: float = 0.0,
                 on_hang: Callable[[str, str], None] | None = None, exit_process: bool = True,
                 collective_timeout_s: float = 0.0, min_step_limit_s: float = 0.0) -> None:
        self.run_dir, self.rank, self.timeout_s = run_dir, rank, float(timeout_s)
        self.on_hang, self.exit_process = on_hang, exit_process
        self.collective_timeout_s, self.min_step_limit_s = collective_timeout_s, min_step_limit_s
        self.first_step = 0
        self._last = (_clock(), 0, "first step")  # (when, step, phase): replaced whole, never mutated
        self._step_times: deque[float] = deque(maxlen=200)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: str | None = None  # the hang file, once written

    def start(self, step: int = 0) -> HangWatchdog:
        self.first_step = step
        self._last = (_clock(), step, "first step")
        self._thread = threading.Thread(target=self._watch, name="mtx-hang-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def beat(self, step: int, phase: str = "step") -> None:
        """Step ``step`` completed (phase ``step``), or a phase begins. Cheap: no lock, no syscall."""
        now = _clock()
        when, last_step, last_phase = self._last
        if phase == "step" and last_phase == "step" and step == last_step + 1:
            self._step_times.append(now - when)
        self._last = (now, step, phase)

    def limit(self, phase: str) -> float:
        """Seconds without a beat after which a rank in ``phase`` counts as hung."""
        if self.timeout_s > 0:
            step_limit = self.timeout_s
        else:
            times = list(self._step_times)
            step_limit = max(FLOOR_S, MULTIPLE * statistics.median(times)) if times else FLOOR_S
            if self.collective_timeout_s:
                step_limit = min(step_limit, COLLECTIVE_SHARE * self.collective_timeout_s)
        step_limit = max(step_limit, self.min_step_limit_s)
        return max(step_limit, LONG_PHASE_S) if phase in LONG_PHASES else step_limit

    @property
    def progressed(self) -> bool:
        """Whether a step completed since :meth:`start` (a requeue after none would hang again)."""
        return self._last[1] > self.first_step

    def _watch(self) -> None:
        while not self._stop.is_set():
            when, step, phase = self._last
            limit = self.limit(phase)
            waited = _clock() - when
            if waited > limit:
                self._fire(step, phase, waited, limit)
                return
            self._stop.wait(min(max(limit - waited, 0.05), 1.0))

    def _fire(self, step: int, phase: str, waited: float, limit: float) -> None:
        what = (f"rank {self.rank} ({socket.gethostname()}, pid {os.getpid()}): no training step completed for "
                f"{waited:.0f} s (limit {limit:.0f} s); last completed step {step}, phase '{phase}'")
        path = hang_file(self.run_dir, self.rank)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(path, "w") as f:
                f.write(what + "\n\nPython stacks of every thread (most recent call first):\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            self.fired = path
        except OSError as e:  # the filesystem may be what hangs: the stacks still go to stderr
            print(f"hang watchdog: cannot write {path} ({e})", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(f"hang watchdog: {what}; stacks in {path}; exiting with code {HANG_EXIT_CODE}", file=sys.stderr,
              flush=True)
        if self.on_hang is not None:
            helper = threading.Thread(target=self._callback, args=(path, what), daemon=True)
            helper.start()
            helper.join(CALLBACK_LIMIT_S)
        if self.exit_process:
            time.sleep(GRACE_S)
            os._exit(HANG_EXIT_CODE)  # the main thread is stuck: no cleanup can run there

    def _callback(self, path: str, what: str) -> None:
        try:
            self.on_hang(path, what)
        except Exception as e:  # noqa: BLE001 - reporting must not keep a hung rank alive
            print(f"hang watchdog: reporting the hang failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
