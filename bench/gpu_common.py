"""Helpers of the one-shot GPU suite (bench/gpu_suite.py): its table sections, number formatting,
device synchronisation, peak memory, the time budget and a median timer."""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MIB = 2 ** 20


class OutOfBudget(Exception):
    """The suite's time budget is spent."""


@dataclass
class Section:
    title: str
    columns: list[str]
    run: Callable[[argparse.Namespace, Section], None]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: bool = False

    def add(self, *cells: Any) -> None:
        self.rows.append([fmt(c) for c in cells])

    def fail(self, e: BaseException, *labels: str) -> None:
        """Record an exception as an error row after ``labels`` (its traceback goes to stderr)."""
        print(f"[gpu_suite] {self.title} {' / '.join(labels)} failed:", file=sys.stderr)
        traceback.print_exc()
        self.error = True
        first = str(e).splitlines()[0] if str(e) else ""
        self.add(*labels, f"error: {type(e).__name__}: {first}"[:300])

    def markdown(self) -> str:
        width = len(self.columns)
        lines = [f"## {self.title}", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * width]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r + [""] * (width - len(r))) + " |"
                  for r in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes] + [""])


def fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1 or abs(x) >= 1e5 else f"{x:,.1f}"
    return str(x)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mib(dev: torch.device, before: int = 0) -> float | str:
    return (torch.cuda.max_memory_allocated(dev) - before) / MIB if dev.type == "cuda" else "n/a (cpu)"


def check_budget(args: argparse.Namespace, need_s: float = 0.0) -> None:
    if time.monotonic() + need_s > args.deadline:
        raise OutOfBudget


def median_time(fn: Callable[[], Any], dev: torch.device, warmup: int, reps: int) -> float:
    times = []
    for i in range(warmup + reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
