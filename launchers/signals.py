"""Preemption: a signal asks for a checkpoint; all ranks agree at a step boundary and stop together.

SLURM warns a job before its time limit or preemption with a signal (``--signal=USR1@120``,
SIGTERM before a kill). A handler only records it; the training loop asks :meth:`Preemption.agreed`
at step boundaries, an all-reduce (MAX) of one integer over the world group, so every rank sees
the request in the same step even when the signal reached one rank only, checkpoints with the
others and leaves with :data:`EXIT_CODE`. A second signal while the checkpoint is written only
sets the flag again. Standard library plus torch.distributed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable

EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "try again later" -- checkpointed, requeue and resume


class Preempted(SystemExit):
    """Raised after a preemption checkpoint: exits the process with :data:`EXIT_CODE`. ``result`` holds
    the caller's summary of the run (e.g. the trainer's result). The signal handlers stay installed
    so that the process leaves with that code even when SIGTERMed meanwhile; a caller that catches
    this and goes on calls :meth:`restore`."""

    def __init__(self, message: str, result=None, restore=None) -> None:
        super().__init__(EXIT_CODE)
        self.message, self.result, self._restore = message, result, restore

    def restore(self) -> None:
        """Put back the signal handlers that were there before training."""
        if self._restore is not None:
            self._restore()
            self._restore = None

    def __str__(self) -> str:
        return self.message


def parse_signals(spec: str) -> list[signal.Signals]:
    """``"USR1,TERM"`` -> [SIGUSR1, SIGTERM]; "" -> []. Raises ValueError naming a bad entry."""
    out = []
    for name in filter(None, (s.strip().upper() for s in spec.split(","))):
        full = name if name.startswith("SIG") else f"SIG{name}"
        sig = getattr(signal.Signals, full, None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{name!r} is not a signal that can be handled (e.g. USR1, USR2, TERM, INT)")
        if sig not in out:
            out.append(sig)
    return out


class Preemption:
    """Records the preemption signals while installed (a context manager; handlers restored on exit)."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = [signal.Signals(s) for s in signals]
        self.received: signal.Signals | None = None  # the first one seen on this process
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def install(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; nothing to install here
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def ignore_further(self) -> None:
        """After the preemption checkpoint: ignore these signals until :meth:`uninstall`. Unlike a Python
        handler, SIG_IGN survives interpreter shutdown, when a launcher's SIGTERM would otherwise kill
        a process that is already leaving with :data:`EXIT_CODE`."""
        if self._previous:
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def agreed(self, device=None, group=None) -> signal.Signals | None:
        """The signal some rank received (the highest number when several did), the same on every rank;
        None when none did. A collective: every rank of ``group`` (default: the world) calls it at the
        same step."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.received
        flag = torch.tensor([int(self.received or 0)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return signal.Signals(int(flag.item())) if flag.item() else None
