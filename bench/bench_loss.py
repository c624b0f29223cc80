"""Peak memory and time of the CLIP loss, column-tiled (mtx_kernels.tiled_loss) vs plain, as N grows.

One data-parallel rank's local loss: B local image/text features against all N gathered ones
(``ClipLoss`` with ``local_loss``), forward and backward, float32. By default B = N / 8, i.e. the
rank's share of a global batch N on 8 ranks; ``--rows`` fixes B instead. The plain loss builds
two B x N logit matrices (and cross-entropy's saved log-softmax and the backward's gradient of
each); the tiled one holds one B x tile block at a time.

Each (N, variant) runs in a fresh interpreter, so one measurement's allocations cannot raise the
next one's peak. After a small warm-up step (thread pools, kernels) and with the N x D inputs
already allocated, the child records:
  cpu:  the growth of the process's peak resident set (``ru_maxrss``) over one forward + backward.
        glibc's dynamic mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed blocks go back
        to the system instead of lingering in the heap; the peak then follows live memory.
  cuda: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the step.
Time is the best of ``--repeat`` forward + backward steps. Ratios are tiled / plain, measured in
this one run; the last column is |loss_tiled - loss_plain|.

    PYTHONPATH=. python bench/bench_loss.py [--device cuda] [--sizes 1024,4096,16384,32768]
                                             [--rows 0] [--dim 512] [--tile 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20


def _child(variant: str, rows: int, cols: int, dim: int, tile: int, device: str, repeat: int) -> dict:
    """One measurement, in this (fresh) process."""
    import resource

    import torch
    import torch.nn.functional as F

    from mtx_kernels.tiled_loss import tiled_clip_loss

    dev = torch.device(device)

    def leaves(n: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return [F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(dev).requires_grad_() for _ in range(2)]

    def step(img_all: torch.Tensor, txt_all: torch.Tensor, b: int) -> torch.Tensor:
        img, txt = img_all[:b], txt_all[:b]  # this rank's rows; their positives are columns 0..b-1
        labels, scale = torch.arange(b, device=dev), torch.tensor(14.3, device=dev, requires_grad=True)
        if variant == "tiled":
            loss = tiled_clip_loss(img, txt_all, txt, img_all, scale, labels, tile)
        else:
            loss = (F.cross_entropy(scale * img @ txt_all.t(), labels)
                    + F.cross_entropy(scale * txt @ img_all.t(), labels)) / 2
        loss.backward()
        img_all.grad = txt_all.grad = None
        return loss.detach()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step(*leaves(256), 64)
    inputs = leaves(cols)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    loss = None
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        loss = step(*inputs, rows)
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"peak_mib": peak / MIB, "time_s": min(times), "loss": float(loss)}


def measure(variant: str, rows: int, cols: int, dim: int, tile: int, device: str, repeat: int) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, str(rows), str(cols), str(dim), str(tile),
           device, str(repeat)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if out.returncode:
        raise RuntimeError(f"{variant} N={cols} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        variant, rows, cols, dim, tile, device, repeat = sys.argv[2:9]
        print(json.dumps(_child(variant, int(rows), int(cols), int(dim), int(tile), device, int(repeat))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--sizes", default="1024,4096,16384,32768", help="global batch sizes N (columns), comma-separated")
    p.add_argument("--rows", type=int, default=0, help="local rows B; 0 = N / --ranks")
    p.add_argument("--ranks", type=int, default=8, help="data-parallel ranks the global batch is split over")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--tile", type=int, default=1024, help="columns per tile of the tiled loss")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per measurement (best is reported)")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON here")
    args = p.parse_args()

    results = []
    head = (f"{'N':>6} {'B':>5} | {'plain MiB':>9} {'tiled MiB':>9} {'ratio':>6} | {'plain s':>7} {'tiled s':>7} "
            f"{'ratio':>6} | {'|dloss|':>7}")
    print(f"CLIP local loss, forward + backward, D={args.dim}, tile={args.tile}, {args.device}, fp32")
    print(head)
    print("-" * len(head))
    for cols in (int(s) for s in args.sizes.split(",")):
        rows = args.rows or max(cols // args.ranks, 1)
        plain = measure("plain", rows, cols, args.dim, args.tile, args.device, args.repeat)
        tiled = measure("tiled", rows, cols, args.dim, args.tile, args.device, args.repeat)
        row = {"N": cols, "B": rows, "D": args.dim, "tile": args.tile, "device": args.device,
               "plain_peak_mib": plain["peak_mib"], "tiled_peak_mib": tiled["peak_mib"],
               "peak_ratio": tiled["peak_mib"] / plain["peak_mib"],
               "plain_s": plain["time_s"], "tiled_s": tiled["time_s"], "time_ratio": tiled["time_s"] / plain["time_s"],
               "loss_diff": abs(tiled["loss"] - plain["loss"])}
        results.append(row)
        print(f"{cols:>6} {rows:>5} | {row['plain_peak_mib']:>9.1f} {row['tiled_peak_mib']:>9.1f} "
              f"{row['peak_ratio']:>6.3f} | {row['plain_s']:>7.3f} {row['tiled_s']:>7.3f} {row['time_ratio']:>6.2f} | "
              f"{row['loss_diff']:>7.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
