"""Training-step throughput: our DeepSpeed engine vs OpenCLIP's own model, loss and optimizer.

Both sides train the same ViT geometry (a model preset, GELU, CLIP vocabulary of 49408) on the
same synthetic batch, in one process:

  ours      the trainer's production step, ``mtx_dist.step.train_step``: ContrastiveModel inside the
            DeepSpeed engine (ZeRO stage 0, world size 1), our ClipLoss, our guarded fused AdamW with
            weight-decay groups.
  openclip  ``open_clip.model.CLIP`` built from CLIPVisionCfg/CLIPTextCfg equal to the preset,
            ``open_clip.loss.ClipLoss``, torch AdamW with OpenCLIP's weight-decay groups, then the
            ``logit_scale.clamp_`` of OpenCLIP's training loop.

A step is forward + loss + backward + optimizer step (gradient clipping at 1.0 on both sides).
Measurements are interleaved: the sides take turns of ``--block`` steps (default 1) in the order
A B B A A B ..., so machine noise (other jobs on a shared machine) falls on both alike; the
reported time is the median per-step time, and the paired ratio is the median over turns of the
ratio of neighbouring step times, the figure least moved by load that drifts. On ``--device cuda``
both run in bf16 (OpenCLIP: autocast; ours: ``parallel.precision=bf16``) unless ``--precision`` says
otherwise; ``--precision amp_bf16``: both autocast the forward to bf16 (OpenCLIP's ``amp_bf16``, ours
``parallel.precision=amp_bf16``), also on CPU.

    PYTHONPATH=. python bench/bench_step.py [--preset tiny] [--batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time

import torch

from mtx_dist.synthetic import synthetic_pairs
from mtx_launchers.env import DIST_VARS
from mtx_dist.interop.torchvision_shim import torchvision_shim

GRAD_CLIP = 1.0


def build_ours(args):
    from mtx_dist.config import load_config
    from mtx_dist.engine import build_engine, build_model, setup_runtime
    from mtx_dist.step import train_step
    from mtx_dist.trainer import step_setup

    cfg = load_config(None, [f"model.preset={args.preset}", "parallel.zero_stage=0", f"run.device={args.device}",
                             f"parallel.precision={args.precision}", f"parallel.matmul_precision={args.matmul_precision}",
                             f"data.batch_size={args.batch}", f"optim.grad_clip={GRAD_CLIP}",
                             "optim.warmup_steps=1", "run.steps=100000"])
    runtime = setup_runtime(cfg)
    if runtime.env.world_size != 1:
        raise SystemExit("run this benchmark as a single process (no launcher variables)")
    engine = build_engine(cfg, build_model(cfg, runtime), runtime)
    setup, steps = step_setup(cfg, runtime, engine), [0]

    def step(image, text):  # the trainer's own step (mtx_dist.step.train_step), not a copy of it
        train_step(setup, iter([{"image": image, "text": text}]), steps[0])
        steps[0] += 1

    return engine.module, step


def build_openclip(args, spec, device):
    torchvision_shim()
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    v, t = spec.vision, spec.text
    vision_cfg = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads,
                               mlp_ratio=v.mlp_ratio, patch_size=v.patch_size, image_size=v.image_size)
    text_cfg = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                           layers=t.layers, mlp_ratio=t.mlp_ratio)
    torch.manual_seed(0)
    model = open_clip.model.CLIP(spec.embed_dim, vision_cfg, text_cfg, quick_gelu=False).to(device)
    params = list(model.named_parameters())
    exclude = [p for n, p in params if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    include = [p for n, p in params if all(p is not q for q in exclude)]
    opt = torch.optim.AdamW([{"params": exclude, "weight_decay": 0.0}, {"params": include, "weight_decay": 0.1}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.loss.ClipLoss()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision != "fp32" \
        else contextlib.nullcontext

    def step(image, text):
        opt.zero_grad(set_to_none=True)
        with autocast():
            img, txt, scale = model(image, text)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return model, step


def timed_steps(step, batch, n: int, device) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(*batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=64, help="samples per step")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    ap.add_argument("--block", type=int, default=1, help="steps a side runs before the other takes its turn")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (both sides)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16", "amp_bf16"), default=None,
                    help="ours: parallel.precision; OpenCLIP autocasts to bf16 unless fp32 (default: bf16 on cuda, "
                         "fp32 on cpu)")
    ap.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default="highest",
                    help="float32 matmul precision of the process, so of both sides (torch.set_float32_matmul_precision; "
                         "ours sets it through parallel.matmul_precision)")
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = ap.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")

    torch.set_num_threads(args.threads)
    for k in DIST_VARS:  # a single process: setup_runtime picks a free loopback port itself
        os.environ.pop(k, None)
    from mtx_dist.models import get_preset
    spec = get_preset(args.preset)
    device = torch.device(args.device)

    ours_model, ours_step = build_ours(args)
    oc_model, oc_step = build_openclip(args, spec, device)
    image, text = synthetic_pairs(spec, args.batch, step=0)
    batch = (image.to(device), text.to(device))
    sides = {"ours": ours_step, "openclip": oc_step}
    for step in sides.values():
        timed_steps(step, batch, args.warmup, device)

    times: dict[str, list[float]] = {name: [] for name in sides}
    rounds = max(1, math.ceil(args.steps / args.block))
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            times[name] += timed_steps(sides[name], batch, args.block, device)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    sps = {name: args.batch / m for name, m in median.items()}
    count = {"ours": sum(p.numel() for p in ours_model.parameters()),
             "openclip": sum(p.numel() for p in oc_model.parameters())}
    ratio = sps["ours"] / sps["openclip"]
    paired = statistics.median(o / t for o, t in zip(times["openclip"], times["ours"]))

    print(f"preset={args.preset} batch={args.batch} device={args.device} threads={args.threads} "
          f"precision={args.precision} matmul_precision={torch.get_float32_matmul_precision()} "
          f"timed steps/side={rounds * args.block} "
          f"interleaved in turns of {args.block}")
    print(f"{'':10} {'params':>12} {'median s/step':>14} {'samples/s':>10}")
    for name in sides:
        print(f"{name:10} {count[name]:>12,} {median[name]:>14.4f} {sps[name]:>10.1f}")
    print(f"ratio ours/openclip (samples/s): {ratio:.3f} of medians, {paired:.3f} paired")
    diff = count["ours"] - count["openclip"]
    print("note: parameter counts are " + ("equal" if diff == 0 else f"different by {diff:+,}") +
          " (same tensors; our logit_scale has shape (1,) where OpenCLIP's is 0-dim, same count). "
          "Ours runs inside the DeepSpeed engine (its gradient all-reduce and clipping), "
          "OpenCLIP as a plain torch loop.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "batch": args.batch, "device": args.device, "threads": args.threads,
                       "precision": args.precision, "matmul_precision": args.matmul_precision,
                       "params": count, "median_step_s": median, "samples_per_s": sps, "ratio": ratio,
                       "paired_ratio": paired, "block": args.block,
                       "step_times_s": times}, f, indent=2)


if __name__ == "__main__":
    main()
