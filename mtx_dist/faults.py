"""Fault injection for the fault-tolerance tests: switches read from ``MTX_FAULTS``, never set in use.

``MTX_FAULTS`` is a comma-separated list of ``kind=point:step[:rank]`` entries:

    kill=step:3          SIGKILL this process right after optimizer step 3 (every rank)
    kill=step:3:1        ... only on rank 1
    kill=save-model:4    SIGKILL during the checkpoint of step 4 at a named point of the write
                         (the points are the names passed to :func:`hit` in mtx_dist.checkpoint)
    nan=loss:5:0         make rank 0's loss NaN at step 5 (1-based: the 5th optimizer step)
    signal=USR1:3:1      rank 1 sends itself SIGUSR1 right after optimizer step 3 (a preemption notice
                         that reached one rank only); the first field names the signal
    hang=step:3:1        rank 1 hangs forever right after optimizer step 3, outside any collective (in
                         :func:`injected_hang`, the frame its hang watchdog's stack file names)
    hang=loader:4:1      rank 1's 4th batch never arrives from its loader (a deadlocked loader)

With ``MTX_FAULTS_RESTART=K`` the faults apply only while ``SLURM_RESTART_COUNT`` is K (unset counts as
0), so a requeued job runs clean. With the variable unset, :func:`hit` and :func:`poison` cost one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

import torch

ENV = "MTX_FAULTS"
RESTART_ENV = "MTX_FAULTS_RESTART"


def _entries(kind: str) -> list[tuple[str, int, int | None]]:
    raw = os.environ.get(ENV, "")
    only_in = os.environ.get(RESTART_ENV)
    if only_in is not None and os.environ.get("SLURM_RESTART_COUNT", "0") != only_in:
        return []
    out = []
    for item in filter(None, (s.strip() for s in raw.split(","))):
        k, _, spec = item.partition("=")
        if k != kind:
            continue
        parts = spec.split(":")
        out.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None))
    return out


def _matches(kind: str, point: str, step: int, rank: int) -> bool:
    return any(p == point and s == step and r in (None, rank) for p, s, r in _entries(kind))


def hit(point: str, step: int, rank: int) -> None:
    """SIGKILL this process if ``kill=point:step[:rank]`` is switched on."""
    if ENV in os.environ and _matches("kill", point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def send_signal(step: int, rank: int) -> None:
    """``os.kill(self, SIG<name>)`` for each ``signal=<name>:step[:rank]`` that matches."""
    if ENV in os.environ:
        for name, s, r in _entries("signal"):
            if s == step and r in (None, rank):
                os.kill(os.getpid(), getattr(signal, f"SIG{name.upper().removeprefix('SIG')}"))


def hang(point: str, step: int, rank: int) -> None:
    """Never return if ``hang=point:step[:rank]`` is switched on."""
    if ENV in os.environ and _matches("hang", point, step, rank):
        injected_hang()


def injected_hang() -> None:
    while True:
        time.sleep(3600)


def poison(point: str, step: int, rank: int, value: torch.Tensor) -> torch.Tensor:
    """``value`` times NaN if ``nan=point:step[:rank]`` is switched on (keeps the autograd graph)."""
    if ENV in os.environ and _matches("nan", point, step, rank):
        return value * float("nan")
    return value
