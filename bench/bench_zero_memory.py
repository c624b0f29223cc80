"""Per-rank memory of parameters + gradients + optimizer state under ZeRO 0/1/2/3 (measured).

Each ZeRO stage runs as its own job of 2 gloo ranks on CPU (fp32 or bf16, our engine with torch AdamW).
Every rank trains two steps (forward, loss, backward, ``engine.step()``) and measures twice in the
second: after ``engine.backward`` (gradients live, optimizer state allocated by the first step)
and after ``engine.step()``; the larger is the rank's figure. Before each measurement the step's
outputs are dropped and ``gc.collect()`` runs, so no activation is alive. A measurement sums the
bytes of the distinct storages (deduplicated by ``untyped_storage().data_ptr()``) of all live
tensors: every tensor ``gc.get_objects()`` finds, their ``.grad``, the model's parameters and,
under ZeRO-3, their ``ds_tensor`` partitions; the input batch is left out. DeepSpeed's flat
buffers and master partitions count: they are what a rank holds. The bytes are split into model
parameters, the optimizer's own parameters not already counted (DeepSpeed's fp32 partitions),
optimizer state, and the rest (gradients and DeepSpeed's buffers, e.g. the reduce bucket).

For reference the table also shows what the ZeRO paper's accounting predicts for AdamW: per
parameter, fp32: 4 B weight + 4 B gradient + 8 B moments (16 B at stage 0); bf16: 2 B weight + 2 B
gradient + 4 B fp32 master + 8 B moments (16 B). Stage 1 partitions master and moments over the N
data-parallel ranks, stage 2 also the gradients, stage 3 everything.

    PYTHONPATH=. python bench/bench_zero_memory.py [--preset tiny] [--precision bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import warnings

import torch

from mtx_launchers.local import run_ranks

WORLD = 2
MIB = 2 ** 20


def _storage_key(t) -> tuple[int, int] | None:
    """(data pointer, bytes) of a CPU tensor's storage, or None for tensors without CPU memory."""
    try:
        if not isinstance(t, torch.Tensor) or t.is_meta or t.device.type != "cpu" or t.is_sparse:
            return None
        st = t.untyped_storage()
        return (st.data_ptr(), st.nbytes()) if st.data_ptr() else None
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):  # DeepSpeed's ZeRO wrappers hold it as .optimizer
        opt = opt.optimizer
    return opt


def live_bytes(engine, batch: list[torch.Tensor]) -> dict[str, int]:
    """Bytes of distinct live storages on this rank, split into categories (first claim wins)."""
    excluded = {k[0] for k in map(_storage_key, batch) if k}
    owner: dict[int, str] = {}
    size: dict[int, int] = {}

    def claim(t, category: str) -> None:
        key = _storage_key(t)
        if key and key[0] not in excluded:
            owner.setdefault(key[0], category)
            size[key[0]] = max(size.get(key[0], 0), key[1])

    opt = _torch_optimizer(engine)
    for p in engine.module.parameters():
        claim(p, "params")
        claim(getattr(p, "ds_tensor", None), "params")
    for group in opt.param_groups:
        for p in group["params"]:
            claim(p, "optim_params")
    for p, state in opt.state.items():  # under ZeRO-3 param_groups are emptied after the step
        claim(p, "optim_params")
        for v in state.values():
            claim(v, "optim_state")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .grad of non-leaf tensors
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                claim(obj, "other")
                claim(obj.grad, "other")
    out = {c: 0 for c in ("params", "optim_params", "optim_state", "other")}
    for ptr, category in owner.items():
        out[category] += size[ptr]
    out["total"] = sum(out.values())
    return out


def one_step(preset: str, stage: int, batch: int, bucket: int, precision: str) -> dict:
    """Runs on each rank: build the engine, train one step, measure."""
    from mtx_dist.config import load_config
    from mtx_dist.engine import build_engine, build_model, setup_runtime
    from mtx_dist.loss import build_loss
    from mtx_dist.parallel import destroy_groups
    from mtx_dist.synthetic import synthetic_pairs

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's use of deprecated collectives
    buckets = [f"parallel.{k}={bucket}" for k in ("reduce_bucket_size", "allgather_bucket_size",
                                                   "stage3_prefetch_bucket_size")]
    cfg = load_config(None, [f"model.preset={preset}", f"parallel.zero_stage={stage}", "run.device=cpu",
                             f"parallel.precision={precision}",
                             f"data.batch_size={batch}", *buckets, "parallel.stage3_param_persistence_threshold=0",
                             "run.steps=10", "optim.warmup_steps=1"])
    runtime = setup_runtime(cfg)
    groups = runtime.groups
    engine = build_engine(cfg, build_model(cfg, runtime), runtime)
    loss_fn = build_loss("clip", groups.dp_group)
    image, text = synthetic_pairs(engine.module.spec, batch * groups.dp_size, step=0)
    image = image.to(runtime.dtype)
    local = [t.chunk(groups.dp_size, dim=0)[groups.dp_rank] for t in (image, text)]
    measured = {}
    for step in range(2):
        loss = loss_fn(*engine(*local))
        engine.backward(loss)
        del loss
        if step == 1:
            gc.collect()
            measured["backward"] = live_bytes(engine, [image, text])
        engine.step()
    gc.collect()
    measured["step"] = live_bytes(engine, [image, text])
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    destroy_groups(groups)
    return {"bytes": measured, "params": numel, "dp_size": groups.dp_size}


def formula_bytes(stage: int, p: int, n: int, precision: str) -> float:
    width = 2 if precision == "bf16" else 4
    param, grad, states = width * p, width * p, (8 + (4 if precision == "bf16" else 0)) * p  # moments (+ master)
    return {0: param + grad + states, 1: param + grad + states / n, 2: param + (grad + states) / n,
            3: (param + grad + states) / n}[stage]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8, help="samples per rank in the measured step")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--bucket", type=int, default=500_000, help="ZeRO reduce/all-gather/prefetch bucket (elements)")
    ap.add_argument("--stages", default="0,1,2,3", help="comma-separated ZeRO stages")
    ap.add_argument("--timeout", type=float, default=150, help="seconds allowed per 2-rank job")
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = ap.parse_args()

    results = {}
    for stage in map(int, args.stages.split(",")):
        ranks = run_ranks(WORLD, one_step, args.preset, stage, args.batch, args.bucket, args.precision,
                          timeout=args.timeout)
        points = [m for r in ranks for m in r["bytes"].values()]
        worst = max(points, key=lambda m: m["total"])
        results[stage] = {"max_rank_bytes": worst["total"], "worst": worst, "per_rank": [r["bytes"] for r in ranks],
                          "after_backward": max(r["bytes"]["backward"]["total"] for r in ranks),
                          "after_step": max(r["bytes"]["step"]["total"] for r in ranks), "params": ranks[0]["params"],
                          "formula_bytes": formula_bytes(stage, ranks[0]["params"], ranks[0]["dp_size"],
                                                         args.precision)}

    p = next(iter(results.values()))["params"]
    print(f"preset={args.preset}  P={p:,} parameters  {WORLD} gloo ranks (CPU)  {args.precision}  torch AdamW")
    print(f"buckets: reduce = allgather = stage3_prefetch = {args.bucket:,} elements ({4 * args.bucket / MIB:.1f} MiB "
          "fp32); stage3_param_persistence_threshold=0 (every parameter partitioned); overlap_comm=true (default)")
    print("MiB/rank = max over ranks and over the two measurement points (after backward, after step)")
    base = results.get(0, {}).get("max_rank_bytes")
    print(f"{'stage':>5} {'bwd':>7} {'step':>7} {'MiB/rank':>9} {'vs ZeRO-0':>9} {'formula':>8} {'vs 16P':>7} | "
          f"{'params':>7} {'opt params':>10} {'opt state':>9} {'other':>7}  (MiB; split of the max)")
    for stage, r in results.items():
        w = r["worst"]
        rel = f"{r['max_rank_bytes'] / base:.3f}" if base else "-"
        print(f"{stage:>5} {r['after_backward'] / MIB:>7.2f} {r['after_step'] / MIB:>7.2f} "
              f"{r['max_rank_bytes'] / MIB:>9.2f} {rel:>9} {r['formula_bytes'] / MIB:>8.2f} "
              f"{r['formula_bytes'] / (16 * p):>7.3f} | {w['params'] / MIB:>7.2f} {w['optim_params'] / MIB:>10.2f} "
              f"{w['optim_state'] / MIB:>9.2f} {w['other'] / MIB:>7.2f}")
    print("note: 'opt params' is DeepSpeed's fp32 master copy of each rank's partition, kept even when the model "
          "is fp32 (fp32, stages 1-3: +4P/N over the formula); 'other' is gradients and buffers. Stage 1/2 gradient "
          "buffers hold every parameter that touches a rank's partition whole, so one large parameter (the "
          "token embedding) is not halved.")
    if base and 3 in results:
        ratio = results[3]["max_rank_bytes"] / base
        print(f"ZeRO-3 / ZeRO-0 at {WORLD} ranks: {ratio:.3f} (goal <= 0.55: {'met' if ratio <= 0.55 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "world": WORLD, "bucket": args.bucket, "stages": results}, f, indent=2)


if __name__ == "__main__":
    main()
