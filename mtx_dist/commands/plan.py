"""``mtx-dist plan``: will this run fit, and how fast will it go on N GPUs? (mtx_dist.plan; no torch)."""

from __future__ import annotations

import argparse

from mtx_dist.config import Config, load_cli_config
from mtx_dist.errors import UserError


class PlanError(UserError, ValueError):
    label = "plan error"


def layout(cfg: Config, gpus: int):
    from mtx_dist.plan import Layout

    p = cfg.parallel
    if gpus < 1 or gpus % p.tensor_parallel:
        raise PlanError(f"--gpus {gpus}: must be a positive multiple of parallel.tensor_parallel ({p.tensor_parallel})")
    if p.tensor_parallel > 8:
        raise PlanError(f"parallel.tensor_parallel = {p.tensor_parallel}: the planner keeps a TP group inside one "
                        "8-GPU node (its all-reduces run on NVLink)")
    return Layout(gpus=gpus, tp=p.tensor_parallel, zero_stage=p.zero_stage, micro_batch=cfg.data.batch_size,
                  grad_accum=cfg.optim.grad_accum, precision=p.precision,
                  activation_checkpointing=p.activation_checkpointing, tile_size=cfg.loss.tile_size,
                  local_loss=cfg.loss.local_loss, overlap_comm=p.overlap_comm, reduce_bucket=p.reduce_bucket_size,
                  allgather_bucket=p.allgather_bucket_size, prefetch_bucket=p.stage3_prefetch_bucket_size)


def _device(args: argparse.Namespace, precision: str):
    from mtx_dist.plan import Device, device

    if args.gpu_memory_gib or args.peak_tflops:
        if not (args.gpu_memory_gib and args.peak_tflops):
            raise PlanError("--gpu-memory-gib and --peak-tflops go together (a GPU not in the table)")
        return Device(args.gpu or "custom", args.gpu_memory_gib, args.peak_tflops, args.nvlink_gbs)
    try:
        return device(args.gpu or "H100", precision)
    except KeyError as e:
        raise PlanError(str(e.args[0])) from None


def _show(p: dict, spec) -> None:
    lay = p["layout"]
    print(f"model: {p['params_total'] / 1e6:,.1f} M parameters (image tower {p['params_image_tower'] / 1e6:,.1f} M), "
          f"{p['flops_per_sample'] / 1e9:,.1f} GFLOP per sample forward; image {spec.vision.image_size} px, "
          f"patch {spec.vision.patch_size}")
    print(f"layout: {lay['gpus']} x {p['gpu']}, TP {lay['tp']}, data-parallel {lay['gpus'] // lay['tp']}, "
          f"ZeRO-{lay['zero_stage']}, {lay['precision']}, micro-batch {lay['micro_batch']} x {lay['grad_accum']} "
          f"accumulation (global batch {p['global_batch']}), activation checkpointing "
          f"{'on' if lay['activation_checkpointing'] else 'off'}")
    mem = p["memory_gib"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in mem.items() if k != "total")
    print(f"memory per GPU: {mem['total']:.2f} GiB of {p['gpu_memory_gib']:.0f} ({parts}): "
          f"{'fits' if p['fits'] else 'DOES NOT FIT'}")
    times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in p["step_time_parts_s"].items())
    print(f"step: {p['step_time_s'] * 1e3:.1f} ms ({times}) at {p['mfu']:.0%} MFU -> {p['samples_per_s']:,.0f} "
          f"samples/s, {p['samples_per_s'] / lay['gpus']:,.0f} per GPU; weak-scaling efficiency from "
          f"{lay['tp']} to {lay['gpus']} GPUs {p['scaling_efficiency']:.0%}")


def _run(args: argparse.Namespace) -> int:
    import json

    for flag in ("mfu", "interconnect_gbps", "nvlink_gbs"):
        if getattr(args, flag) <= 0:
            raise PlanError(f"--{flag.replace('_', '-')} = {getattr(args, flag)}: must be > 0")
    if args.mfu > 1:
        raise PlanError(f"--mfu = {args.mfu}: a fraction of the peak, at most 1")

    from mtx_dist.plan import plan, search

    cfg = load_cli_config(args.config, args.overrides)  # a ConfigError is one line and exit 2
    spec, dev = cfg.model.spec, _device(args, cfg.parallel.precision)
    base = layout(cfg, args.gpus)
    result = plan(spec, base, dev, args.mfu, args.interconnect_gbps)
    best = search(spec, base, dev, args.mfu, args.interconnect_gbps)[:5] if args.search else []
    if args.json:
        print(json.dumps({**result, "search": best} if args.search else result, sort_keys=True))
        return 0
    _show(result, spec)
    if args.search:
        print(f"\nfastest layouts that fit (same global batch {base.global_batch} on {args.gpus} GPUs):")
        for p in best:
            lay = p["layout"]
            print(f"  TP {lay['tp']}, ZeRO-{lay['zero_stage']}, micro-batch {lay['micro_batch']} x "
                  f"{lay['grad_accum']}, checkpointing {'on' if lay['activation_checkpointing'] else 'off'}: "
                  f"{p['memory_per_gpu_gib']:.1f} GiB, {p['samples_per_s']:,.0f} samples/s")
        if not best:
            print("  none: no layout of this batch fits; lower data.batch_size or add GPUs")
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="predict per-GPU memory, step time and scaling of a config on N GPUs",
                       description="Per-GPU memory (parameters, gradients, optimizer state, activations, "
                       "contrastive logits, buffers), whether it fits, model FLOPs, step time and samples/s, and "
                       "weak-scaling efficiency, for the configured model, batch, precision, ZeRO stage, TP, "
                       "activation checkpointing and loss tiling. Assumptions: docs/SCALING.md.")
    p.add_argument("config", nargs="?", help="TOML config file (optional)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu", help="H100 (default), H200, GH200, A100, A100-40GB, H100 PCIe")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of a GPU not in the table")
    p.add_argument("--peak-tflops", type=float, help="dense peak TFLOP/s at the run's precision (GPU not in the table)")
    p.add_argument("--nvlink-gbs", type=float, default=360.0, help="with --peak-tflops: intra-node all-reduce "
                   "bus bandwidth, GB/s (default 360)")
    p.add_argument("--interconnect-gbps", type=float, default=400.0, help="network per GPU between nodes, Gb/s "
                   "(default 400: InfiniBand NDR)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization of the compute (default 0.4)")
    p.add_argument("--search", action="store_true", help="also list the fastest layouts that fit")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the text")
    p.set_defaults(func=_run)
