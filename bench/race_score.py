"""The race's records and its scoring: checkpoints with their held-out metric, one side per trainer
and variant, seeds merged into a mean curve, the time each side needs to reach OpenCLIP's final
metric, the wall-clock ratio at equal steps, the final metric's difference to OpenCLIP paired by
seed, and the markdown table (bench/bench_race.py)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class Point:
    step: int
    time_s: float  # checkpoint written, seconds after the trainer process started
    path: str  # what the judge loads
    metric: float | None = None
    i2t_r1: float | None = None
    t2i_r1: float | None = None


@dataclass
class Side:
    dataset: str
    name: str  # "openclip" or "ours:<variant>"
    overrides: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    samples_per_s: float | None = None
    points: list[Point] = field(default_factory=list)
    time_to_target_s: float | None = None
    target_bound: str = ""  # "<=" when the first checkpoint already passes the target
    speedup: float | None = None
    error: str = ""
    seed: int = 0
    init: str = ""  # the open_clip folder of the initial weights both sides start from ("" = its own)
    seed_finals: dict[int, float] = field(default_factory=dict)  # seed -> final, when several seeds were merged
    equal_steps_ratio: float | None = None  # OpenCLIP's wall-clock / this side's, both over the same steps
    paired_delta: float | None = None  # mean over seeds of (this side's final - OpenCLIP's, same seed)
    paired_se: float | None = None  # its standard error (>= 2 seeds)

    @property
    def final(self) -> float | None:
        return self.points[-1].metric if self.points else None



def time_to(points: list[Point], target: float) -> tuple[float | None, str]:
    """When the metric first reaches ``target``, interpolated between the checkpoints around it."""
    for i, p in enumerate(points):
        if p.metric is not None and p.metric >= target:
            if i == 0:
                return p.time_s, "<="
            q = points[i - 1]
            return q.time_s + (target - q.metric) / (p.metric - q.metric) * (p.time_s - q.time_s), ""
    return None, ""


def merge_seeds(runs: list[Side]) -> list[Side]:
    """One side per name: at each checkpoint step the mean metric and the mean time over its seeds
    (steps every seed reached), wall-clock and samples/s averaged; each seed's final kept."""
    merged: dict[str, Side] = {}
    for name in dict.fromkeys(r.name for r in runs):
        group = [r for r in runs if r.name == name]
        ok = [r for r in group if not r.error and r.points and all(p.metric is not None for p in r.points)]
        out = Side(group[0].dataset, name, group[0].overrides, error=next((r.error for r in group if r.error), ""))
        merged[name] = out
        if not ok or len(ok) < len(group):
            out.error = out.error or "a seed produced no scores"
            continue
        steps = sorted(set.intersection(*({p.step for p in r.points} for r in ok)))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        for step in steps:
            pts = [next(p for p in r.points if p.step == step) for r in ok]
            out.points.append(Point(step, mean([p.time_s for p in pts]), pts[0].path, mean([p.metric for p in pts]),
                                    mean([p.i2t_r1 for p in pts]), mean([p.t2i_r1 for p in pts])))
        out.wall_s = mean([r.wall_s for r in ok])
        rates = [r.samples_per_s for r in ok if r.samples_per_s]
        out.samples_per_s = mean(rates) if rates else None
        out.seed_finals = {r.seed: r.final for r in sorted(ok, key=lambda r: r.seed)}
    return list(merged.values())


def paired_difference(finals: list[float], reference: list[float]) -> tuple[float, float | None]:
    """Mean of the per-seed differences and its standard error (None with one seed). Seed k of both
    sides starts from the same initial weights, so pairing removes the spread the initialisation causes."""
    diffs = [a - b for a, b in zip(finals, reference, strict=True)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


def score_race(sides: list[Side]) -> None:
    ref = next((s for s in sides if s.name == "openclip" and s.final is not None), None)
    if ref is None:
        return
    target = ref.final
    for s in sides:
        if s is ref:
            continue
        if s.wall_s and ref.wall_s and s.points and [p.step for p in s.points] == [p.step for p in ref.points]:
            s.equal_steps_ratio = ref.wall_s / s.wall_s
        finals, reference = s.seed_finals or {s.seed: s.final}, ref.seed_finals or {ref.seed: ref.final}
        if s.final is not None and finals.keys() == reference.keys():
            seeds = sorted(finals)
            s.paired_delta, s.paired_se = paired_difference([finals[k] for k in seeds], [reference[k] for k in seeds])
    for s in sides:
        if s.points and s.final is not None:
            s.time_to_target_s, s.target_bound = time_to(s.points, target)
    if ref.time_to_target_s and not ref.target_bound:  # OpenCLIP's own time is an interpolation or a checkpoint
        for s in sides:
            if s.time_to_target_s:
                s.speedup = ref.time_to_target_s / s.time_to_target_s


def table(sides: list[Side]) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    rows = ["| data | side | wall s | samples/s | final metric (i2t/t2i R@1) | time to OpenCLIP final s | speed-up | "
            "wall-clock ratio at equal steps | final - OpenCLIP's, paired by seed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for s in sides:
        if s.error:
            rows.append(f"| {s.dataset} | {s.name} | failed: {s.error.splitlines()[0]} | | | | | | |")
            continue
        last = s.points[-1] if s.points else None
        final = "-"
        if last is not None and last.metric is not None:
            final = f"{last.metric:.3f} ({last.i2t_r1:.3f}/{last.t2i_r1:.3f})"
        if len(s.seed_finals) > 1:
            final += " seeds " + "/".join(f"{x:.3f}" for x in s.seed_finals.values())
        ttt = "-" if s.time_to_target_s is None else f"{s.target_bound}{s.time_to_target_s:.1f}"
        speedup = "-" if s.speedup is None else f"{'>=' if s.target_bound else ''}{s.speedup:.2f}"
        delta = "-" if s.paired_delta is None else f"{s.paired_delta:+.3f}" + (
            "" if s.paired_se is None else f" +- {s.paired_se:.3f} (s.e.)")
        rows.append(f"| {s.dataset} | {s.name} | {s.wall_s:.1f} | {f(s.samples_per_s, '.1f')} | {final} | {ttt} | "
                    f"{speedup} | {f(s.equal_steps_ratio, '.2f')} | {delta} |")
    return "\n".join(rows)
