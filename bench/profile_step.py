"""Where the time of one production training step goes (torch.profiler, CPU by default).

Profiles ``mtx_dist.step.train_step`` (the trainer's own step) on batches of demo captions (the
quickstart's text lengths) and random images, after warm-up steps, and prints the operators with the
most self time plus the step's share per phase (forward, backward, optimizer). Config overrides
choose what is profiled, e.g. the state before the speed work against today's defaults:

    PYTHONPATH=. python bench/profile_step.py data.text_trim=false optim.implementation=for-loop
    PYTHONPATH=. python bench/profile_step.py model.patch_dropout=0.5
"""

from __future__ import annotations

import argparse
import itertools
import os
import random

import torch

from mtx_launchers.env import DIST_VARS


def demo_captions(n: int, seed: int = 0) -> list[str]:
    from mtx_data_pipelines.demo import COLORS, POSITIONS, SHAPES, SIZES, TEMPLATES
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)),
                                         position=rng.choice(list(POSITIONS)), size=rng.choice(list(SIZES)))
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="config overrides (section.key=value)")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", type=int, default=15, help="operators listed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for k in DIST_VARS:
        os.environ.pop(k, None)

    from mtx_data_pipelines.tokenizer import ClipTokenizer
    from mtx_dist.data import text_pad_multiple
    from mtx_dist.config import load_config
    from mtx_dist.engine import build_engine, build_model, setup_runtime
    from mtx_dist.step import train_step
    from mtx_dist.trainer import patch_dropout_at, step_setup

    cfg = load_config(None, ["run.device=cpu", "optim.warmup_steps=1", "run.steps=100000", *args.overrides])
    runtime = setup_runtime(cfg)
    engine = build_engine(cfg, build_model(cfg, runtime), runtime)
    setup = step_setup(cfg, runtime, engine)
    spec = cfg.model.spec
    tok = ClipTokenizer(context_length=spec.text.context_length)
    b, size = cfg.data.batch_size, spec.vision.image_size

    def batches():
        for i in itertools.count():
            text = tok(demo_captions(b, i), pad_multiple=text_pad_multiple(cfg))
            yield {"image": torch.randn(b, 3, size, size), "text": torch.from_numpy(text)}

    feed = batches()
    drop = patch_dropout_at(cfg, 0)
    for s in range(args.warmup):
        train_step(setup, feed, s, drop)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for s in range(args.warmup, args.warmup + args.steps):
            with torch.profiler.record_function("step"):
                train_step(setup, feed, s, drop)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"preset={cfg.model.preset} batch={b} threads={args.threads} overrides={' '.join(args.overrides) or '-'}")
    print(f"{args.steps} steps profiled: {total / args.steps / 1e3:.1f} ms self CPU time per step")
    print(f"{'operator':44} {'self ms/step':>12} {'share':>7}")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]:
        print(f"{e.key[:44]:44} {e.self_cpu_time_total / args.steps / 1e3:>12.2f} {e.self_cpu_time_total / total:>7.1%}")


if __name__ == "__main__":
    main()
