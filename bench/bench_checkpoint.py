"""The training stall per checkpoint save, synchronous vs ``checkpoint.async``, and synchronous saves
written past the page cache (``checkpoint.direct_io``, the default) vs through it (measured side by side).

One job of 2 gloo ranks on CPU runs the production pieces: the engine of ``mtx-dist train``
(``--preset``, bf16, ZeRO-1 by default), :func:`mtx_dist.step.train_step` on a synthetic batch, and
the two savers of the trainer: ``checkpoint.save`` (synchronous; its direct and buffered writes
alternate, ABBA) and :class:`mtx_dist.async_checkpoint.AsyncCheckpointer`. Each rank alternates: a
save, then training steps. The stall of a save is the wall-clock the training thread spends inside
the save call (the slower rank's, as the next collective waits for it); for async saves the steps after it run while the
files are written, so the step time with a write in flight is reported too, and the save's end is
agreed through the steps' own collective, as in the trainer. The first async save allocates its host
buffers (later ones reuse them), so it is reported on its own.

    PYTHONPATH=. python bench/bench_checkpoint.py [--preset vit-b16] [--saves 3] [--dir /fast/disk] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings

import torch

from mtx_launchers.local import run_ranks

WORLD = 2


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def ranks_job(preset: str, stage: int, precision: str, saves: int, steps_between: int, run_dir: str) -> dict:
    """On each rank: build the engine, then time sync saves and async saves between training steps."""
    import torch.distributed as dist

    from mtx_dist import checkpoint as ckpt
    from mtx_dist.async_checkpoint import IDLE, AsyncCheckpointer
    from mtx_dist.config import load_config
    from mtx_dist.engine import build_engine, build_model, setup_runtime
    from mtx_dist.parallel import destroy_groups
    from mtx_dist.step import train_step
    from mtx_dist.synthetic import synthetic_pairs
    from mtx_dist.trainer import step_setup

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = load_config(None, [f"model.preset={preset}", f"parallel.zero_stage={stage}", "run.device=cpu",
                             f"parallel.precision={precision}", "data.batch_size=1", "run.steps=1000",
                             "optim.warmup_steps=1", f"run.dir={run_dir}"])
    runtime = setup_runtime(cfg)
    rank = runtime.env.rank
    engine = build_engine(cfg, build_model(cfg, runtime), runtime)
    setup = step_setup(cfg, runtime, engine)
    image, text = synthetic_pairs(engine.module.spec, WORLD, step=0)
    batch = {"image": image[rank:rank + 1], "text": text[rank:rank + 1]}

    def batches():
        while True:
            yield batch

    feed, state = batches(), ckpt.TrainState()
    out: dict = {"sync_stall_s": [], "sync_buffered_stall_s": [], "async_stall_s": [], "step_s_idle": [],
                 "step_s_writing": [], "async_steps_to_commit": []}

    def step(saver=None) -> float:
        t0 = time.perf_counter()
        result = train_step(setup, feed, state.step, checkpoint=saver.status() if saver else IDLE)
        if saver is not None:
            saver.agreed(result.checkpoint)
        state.step += 1
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up: optimizer state allocated, first-step costs paid
        step()
    kinds = [(True, "sync_stall_s"), (False, "sync_buffered_stall_s")]
    for i in range(saves):
        for direct, key in kinds if i % 2 == 0 else kinds[::-1]:  # ABBA: neither always goes first
            dist.barrier()
            t0 = time.perf_counter()
            ckpt.save(engine, run_dir, state, rank, keep=1, direct=direct)
            out[key].append(time.perf_counter() - t0)
            for _ in range(steps_between):
                out["step_s_idle"].append(step())
    out["bytes_per_save"] = _folder_bytes(os.path.join(ckpt.checkpoint_root(run_dir), ckpt.tag_for(state.step -
                                                                                                   steps_between)))
    saver = AsyncCheckpointer(run_dir, rank, runtime.device, keep=1)  # direct I/O, as the trainer's default
    for _ in range(saves):
        dist.barrier()
        t0 = time.perf_counter()
        target = saver.save(engine, state)
        out["async_stall_s"].append(time.perf_counter() - t0)
        n = 0
        while saver.last != target:  # train on until every rank agreed that it is written and committed
            (out["step_s_writing"] if saver.status() != IDLE else out["step_s_idle"]).append(step(saver))
            n += 1
            if n > 200:
                raise RuntimeError("an asynchronous save was not committed within 200 steps")
        out["async_steps_to_commit"].append(n)
    saver.drain()
    saver.close()
    destroy_groups(runtime.groups)
    out["params"] = sum(p.numel() for p in engine.module.parameters())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="vit-b16")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--stage", type=int, default=1, help="ZeRO stage")
    ap.add_argument("--saves", type=int, default=3, help="saves of each kind")
    ap.add_argument("--steps-between", type=int, default=2, help="training steps after each synchronous save")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder under /tmp)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()

    run_dir = tempfile.mkdtemp(prefix="mtx-bench-ckpt-", dir=args.dir)
    try:
        ranks = run_ranks(WORLD, ranks_job, args.preset, args.stage, args.precision, args.saves,
                          args.steps_between, run_dir, timeout=args.timeout)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    # a save stalls training for as long as its slower rank
    sync = [max(r["sync_stall_s"][i] for r in ranks) for i in range(args.saves)]
    buffered = [max(r["sync_buffered_stall_s"][i] for r in ranks) for i in range(args.saves)]
    asyn = [max(r["async_stall_s"][i] for r in ranks) for i in range(args.saves)]
    idle = statistics.median(s for r in ranks for s in r["step_s_idle"])
    writing = [s for r in ranks for s in r["step_s_writing"]]
    later = asyn[1:] or asyn
    res = {"preset": args.preset, "precision": args.precision, "zero_stage": args.stage, "world": WORLD,
           "params": ranks[0]["params"], "bytes_per_save": ranks[0]["bytes_per_save"],
           "sync_stall_s": sync, "sync_buffered_stall_s": buffered, "async_stall_s": asyn, "step_s_idle_median": idle,
           "step_s_writing_median": statistics.median(writing) if writing else None,
           "async_steps_to_commit": ranks[0]["async_steps_to_commit"],
           "stall_ratio": statistics.median(sync) / statistics.median(later)}
    gib = res["bytes_per_save"] / 2**30
    print(f"preset={args.preset} ({res['params'] / 1e6:.0f} M parameters), {args.precision}, ZeRO-{args.stage}, "
          f"{WORLD} gloo ranks (CPU), checkpoint {gib:.2f} GiB per save, folder {args.dir or tempfile.gettempdir()}")
    print(f"{'saver':<6} {'stall per save (s), each':<32} {'median':>7}")
    print(f"{'sync':<6} {' '.join(f'{x:.3f}' for x in sync):<32} {statistics.median(sync):>7.3f}  (direct I/O)")
    print(f"{'sync':<6} {' '.join(f'{x:.3f}' for x in buffered):<32} {statistics.median(buffered):>7.3f}  "
          f"(through the page cache: checkpoint.direct_io=false)")
    print(f"{'async':<6} {' '.join(f'{x:.3f}' for x in asyn):<32} {statistics.median(later):>7.3f}  "
          f"(median of saves 2..{args.saves}: the first allocates the host buffers)")
    print(f"stall ratio sync/async: {res['stall_ratio']:.1f}x; training step {idle:.3f} s with no write in flight, "
          f"{res['step_s_writing_median'] or float('nan'):.3f} s while one is written (median); "
          f"async saves committed after {res['async_steps_to_commit']} steps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
