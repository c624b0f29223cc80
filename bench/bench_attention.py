"""Attention throughput of every available backend at the shapes our presets run.

FLOPs counted as 4·B·H·N²·D for the forward (QKᵀ and PV), 2.5x that for the backward (dV, dP, dQ,
dK plus the recomputation of QKᵀ in the flash-style kernels), halved for causal attention. Each
backend is timed on the same q, k, v; the median of ``--reps`` timed calls after ``--warmup``.
Backends that cannot run here (flash-attn not installed, Triton without a GPU) are listed as such.

    PYTHONPATH=. python bench/bench_attention.py [--device cuda] [--dtype bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mtx_kernels

# name: (heads, tokens, head dim, causal) -- image towers and their text towers
SHAPES = {
    "vit-b16 image": (12, 197, 64, False),
    "vit-l14 image": (16, 257, 64, False),
    "vit-b16 text": (8, 77, 64, True),
    "vit-l14 text": (12, 77, 64, True),
    "head dim 80": (8, 197, 80, False),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _time(fn, device: torch.device, warmup: int, reps: int) -> float:
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(backend: str, shape, batch: int, dtype: torch.dtype, device: torch.device, warmup: int,
              reps: int) -> dict:
    heads, n, d, causal = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, d, device=device, dtype=dtype, generator=g, requires_grad=True)
               for _ in range(3))
    try:
        mtx_kernels.resolve_backend(backend, q)
    except mtx_kernels.AttentionBackendError as e:
        return {"error": str(e).split(": ", 1)[-1]}
    grad = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            mtx_kernels.attention(q, k, v, causal=causal, backend=backend)

    def fwd_bwd():
        out = mtx_kernels.attention(q, k, v, causal=causal, backend=backend)
        torch.autograd.grad(out, (q, k, v), grad)

    flops = 4 * batch * heads * n * n * d * (0.5 if causal else 1.0)
    t_fwd = _time(fwd, device, warmup, reps)
    t_all = _time(fwd_bwd, device, warmup, reps)
    return {"fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_all * 1e3, "fwd_tflops": flops / t_fwd / 1e12,
            "fwd_bwd_tflops": 3.5 * flops / t_all / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on cuda, 2 on cpu")
    ap.add_argument("--backends", default="flash_attn,triton,sdpa,math")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    batch = args.batch or (64 if device.type == "cuda" else 2)
    backends = args.backends.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device={name} dtype={str(dtype).removeprefix('torch.')} batch={batch} "
          f"(fwd FLOPs 4*B*H*N^2*D, fwd+bwd 3.5x, causal half)")
    results: dict = {}
    print(f"{'shape':<15} {'backend':<11} {'fwd ms':>8} {'TFLOP/s':>8} {'f+b ms':>8} {'TFLOP/s':>8} {'vs sdpa':>8}")
    for sname, shape in SHAPES.items():
        results[sname] = {b: bench_one(b, shape, batch, dtype, device, args.warmup, args.reps) for b in backends}
        ref = results[sname].get("sdpa", {}).get("fwd_bwd_tflops")
        for b, r in results[sname].items():
            if "error" in r:
                print(f"{sname:<15} {b:<11} {'unavailable: ' + r['error']}")
                continue
            rel = f"{r['fwd_bwd_tflops'] / ref:.2f}x" if ref else "-"
            print(f"{sname:<15} {b:<11} {r['fwd_ms']:>8.3f} {r['fwd_tflops']:>8.2f} {r['fwd_bwd_ms']:>8.3f} "
                  f"{r['fwd_bwd_tflops']:>8.2f} {rel:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "dtype": str(dtype), "batch": batch, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
