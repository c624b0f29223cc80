"""One-shot GPU benchmark suite: one markdown table (``--out``, default gpu_suite.md), also printed.

For a single run of at most ~8 min (``--budget-s`` 480) on a lent H200; ``--smoke`` runs every code path on CPU
at micro sizes in under a minute (CI: tests/test_gpu_suite_smoke.py). An exception in a section (or in one
training variant or attention backend) goes to stderr with its traceback and becomes an error row; the rest
still runs, and with ``--smoke`` the exit status is then 1. What the budget leaves no time for is reported as
"skipped: budget". Sections 2-4 (cheap) run before 1, so it cannot starve them; the table keeps order 1-4.

1. Training steps: the production ``mtx_dist.step.train_step`` (DeepSpeed ZeRO-0, world size 1, built by
   load_config, setup_runtime, build_model, build_engine, trainer.step_setup) on one on-device batch: images
   randn, captions SOT .. EOT=49407 (the largest id) of 8..30 tokens zero padded to the context (micro: 4..8
   of 16). Variants: baseline (full context, eager), +trim (text cut to the longest caption rounded up to 8,
   trimmed_length), +FLIP 0.5 (patch dropout), +low-res (model.train_image_size at 5/7 of the grid: 160 px
   for 224), +compile (run.compile), trim+FLIP+compile. samples/s of the timed
   steps after the warm-up ones (synchronised), model TFLOP/s and MFU (mtx_dist.flops, tokens actually
   computed), peak allocated memory (reset per variant, weights and optimizer included), compile time =
   warm-up time - warm-up steps x steady step time. Smoke compiles with aot_eager: inductor's C++ build of
   every kernel takes minutes on two cores; dynamo tracing and compile_engine still run.
2. Attention: mtx_kernels.attention as sdpa forced to its flash kernel, sdpa as torch dispatches it (named),
   our triton kernel and flash_attn if installed, at the ViT-B/16 and ViT-L/14 image-tower shapes, bf16
   (smoke: fp32, triton in its interpreter, tiny shapes). Output and dq/dk/dv errors against the fp32 math
   reference on the same inputs, max|x - ref| / max|ref|; TFLOP/s of fwd+bwd, FlashAttention-2 convention
   (fwd 4*B*H*N^2*D, bwd 2.5x fwd).
3. Tiled CLIP loss: a data-parallel rank's local loss (B = N/8 rows vs N columns, D = 512, fp32), fwd+bwd,
   plain (B x N logits) vs mtx_kernels.tiled_loss.tiled_clip_loss: peak allocated memory beyond the inputs
   (CUDA), time, and both losses (must agree to 1e-4 relative).
4. DALI: images/s of fn.decoders.image on in-memory PIL-made JPEGs fed by external_source, device "mixed"
   (and "cpu") on GPU, "cpu" with device_id=None in smoke mode.

    bash bench/gpu_suite.sh [--smoke] [--out gpu_suite.md] [--batch 256] [--budget-s 480] [--sections 1,2,3,4]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import itertools
import math
import os
import platform
import shlex
import sys
import time
from typing import Any

import torch  # does not import triton: TRITON_INTERPRET can still be set in main()

import mtx_dist  # noqa: F401,E402  first of ours: without an install it maps the leaf packages' names

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:  # the suite's helpers, also when loaded by path (tests)
    sys.path.insert(0, BENCH)
from gpu_common import (OutOfBudget, Section, check_budget, fmt, free, median_time, peak_mib,  # noqa: E402
                        sync, version)

SOT, EOT = 49406, 49407
TRAIN_TARGETS = {"vit-b16": (3200.0, 5500.0)}  # samples/s per H200: without FLIP, with FLIP 0.5


# -- 1. training steps ----------------------------------------------------------------------------------

def synthetic_batch(spec, n: int, dev: torch.device, dtype: torch.dtype, trim: bool) -> dict:
    """Images randn; captions SOT, random ids, EOT, of realistic lengths, zero padded (trimmed if asked)."""
    from mtx_data_pipelines.tokenizer import TEXT_PAD_MULTIPLE, trimmed_length
    g = torch.Generator().manual_seed(0)
    ctx, size = spec.text.context_length, spec.vision.image_size
    lengths = torch.randint(min(8, max(2, ctx // 4)), min(30, max(2, ctx // 2)) + 1, (n,), generator=g)
    text = torch.randint(1, SOT, (n, ctx), generator=g)
    text = torch.where(torch.arange(ctx) < lengths[:, None], text, torch.zeros_like(text))
    text[:, 0] = SOT
    text[torch.arange(n), lengths - 1] = EOT
    if trim:
        text = text[:, :trimmed_length(int(lengths.max()), ctx, TEXT_PAD_MULTIPLE)]
    image = torch.randn(n, 3, size, size, generator=g)
    return {"image": image.to(dev, dtype), "text": text.to(dev)}


def run_training(args: argparse.Namespace, sec: Section) -> None:
    import mtx_kernels
    from mtx_dist.config import load_config
    from mtx_dist.engine import setup_runtime
    from mtx_dist.flops import peak_tflops
    from mtx_dist.models import get_preset
    from mtx_dist.parallel import destroy_groups
    from mtx_launchers.env import DIST_VARS

    for k in DIST_VARS:  # one process: setup_runtime picks a free loopback port itself
        os.environ.pop(k, None)
    if args.compile_backend != "inductor":
        # DeepSpeedEngine.compile binds its default backend ('inductor') when deepspeed is imported.
        from deepspeed.runtime.engine import DeepSpeedEngine
        DeepSpeedEngine.compile.__defaults__ = (args.compile_backend, *DeepSpeedEngine.compile.__defaults__[1:])
    dev, spec = args.dev, get_preset(args.preset)
    precision = "bf16" if dev.type == "cuda" else "fp32"
    peak = peak_tflops(torch.cuda.get_device_name(dev), precision) if dev.type == "cuda" else None
    probe = torch.empty(1, 1, 8, 64, device=dev, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    sec.notes.append(f"preset {args.preset}, batch {args.batch}/GPU, {precision}, ZeRO-0, world size 1, "
                     f"model.attention={args.attention} (runs {mtx_kernels.resolve_backend(args.attention, probe)}), "
                     f"compile backend {args.compile_backend}; {args.warmup} warm-up + {args.steps} timed steps; "
                     f"MFU against {fmt(peak)} TFLOP/s ({precision} datasheet peak)")
    low = max(1, spec.vision.grid * 5 // 7) * spec.vision.patch_size  # CLIPA: ~half the patches (224 -> 160 px)
    variants = [("baseline", False, 0.0, False, 0), ("+trim", True, 0.0, False, 0), ("+FLIP 0.5", False, 0.5, False, 0),
                (f"+low-res {low} px", False, 0.0, False, low), ("+compile", False, 0.0, True, 0),
                ("all (trim+FLIP+compile)", True, 0.5, True, 0)]
    for name, trim, flip, compiled, size in variants:
        if time.monotonic() + (150.0 if compiled and dev.type == "cuda" else 0.0) > args.deadline:
            sec.add(name, "skipped: budget")  # a compile on the GPU takes a minute or two
            continue
        free(dev)
        cfg = load_config(None, [f"model.preset={args.preset}", "parallel.zero_stage=0", f"run.device={dev.type}",
                                 f"parallel.precision={precision}", f"data.batch_size={args.batch}",
                                 f"model.attention={args.attention}", f"model.patch_dropout={flip}",
                                 f"data.text_trim={str(trim).lower()}", f"run.compile={str(compiled).lower()}",
                                 f"model.train_image_size={size}",
                                 "optim.warmup_steps=1", "run.steps=100000", "tracking.enabled=false"])
        runtime = setup_runtime(cfg)
        try:
            if runtime.env.world_size != 1:
                raise RuntimeError("run the suite as a single process (no launcher variables)")
            sec.add(name, *train_variant(args, cfg, runtime, trim, flip, compiled, spec, peak, size))
        except Exception as e:  # this variant's row; the next ones still run
            sec.fail(e, name)
        finally:
            destroy_groups(runtime.groups)
            if compiled:
                torch._dynamo.reset()
            free(dev)


def train_variant(args: argparse.Namespace, cfg, runtime, trim: bool, flip: float, compiled: bool, spec,
                  peak: float | None, image_size: int = 0) -> list[Any]:
    """One variant's cells: its engine is built here and released when this returns."""
    from mtx_dist.engine import build_engine, build_model
    from mtx_dist.flops import train_flops_per_sample
    from mtx_dist.models import kept_patches
    from mtx_dist.step import train_step
    from mtx_dist.trainer import step_setup

    dev = args.dev
    engine = build_engine(cfg, build_model(cfg, runtime), runtime)
    setup = step_setup(cfg, runtime, engine)
    batch = synthetic_batch(spec, args.batch, dev, runtime.dtype, trim)
    batches = itertools.repeat(batch)
    engine.train()
    marks = []
    for first, count in ((0, args.warmup), (args.warmup, args.steps)):
        sync(dev)
        marks.append(time.perf_counter())
        for step in range(first, first + count):
            result = train_step(setup, batches, step, patch_dropout=flip, image_size=image_size)
    sync(dev)
    marks.append(time.perf_counter())
    loss = float(result.losses.float().mean())
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    step_s = (marks[2] - marks[1]) / args.steps
    sps = args.batch / step_s
    grid = (image_size or spec.vision.image_size) // spec.vision.patch_size
    kept = kept_patches(grid ** 2, flip)
    text_tokens = batch["text"].shape[1]
    tflops = sps * train_flops_per_sample(spec, 1 + kept, text_tokens, grid=grid) / 1e12
    compile_s = max(0.0, marks[1] - marks[0] - args.warmup * step_s) if compiled else "-"
    target = "-"
    if args.preset in TRAIN_TARGETS:
        want = TRAIN_TARGETS[args.preset][1 if flip else 0]
        target = f">= {want:,.0f} " + ("ok" if sps >= want else "MISSED")
    cells = [f"{1 + kept}/{text_tokens}", sps, step_s * 1e3, tflops, tflops / peak if peak else None,
             peak_mib(dev), compile_s, loss, target]
    del engine, setup, batch, batches, result
    return cells


# -- 2. attention backends ------------------------------------------------------------------------------

def run_attention(args: argparse.Namespace, sec: Section) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import mtx_kernels
    from mtx_kernels.dispatch import math_attention

    dev, dtype = args.dev, (torch.bfloat16 if args.dev.type == "cuda" else torch.float32)
    sdpa_names = {int(v.value): k for k, v in SDPBackend.__members__.items()}
    shapes = {"vit-b16": (64, 12, 197, 64), "vit-l14": (64, 16, 257, 64)}
    if args.smoke:  # the Triton interpreter is slow: tiny stand-ins with the same head dim
        shapes = {"vit-b16 (smoke)": (1, 2, 40, 64), "vit-l14 (smoke)": (1, 2, 52, 64)}
    reps, warmup = (1, 1) if args.smoke else (20, 3)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    sec.notes += [f"{str(dtype).removeprefix('torch.')} inputs; errors vs the fp32 math reference on the same inputs, "
                  f"max|x - ref| / max|ref| (bwd: worst of dq, dk, dv); goal: within {tol:g}, and triton >= 0.9x "
                  "sdpa-flash TFLOP/s",
                  "TFLOP/s of fwd+bwd: fwd 4*B*H*N^2*D, bwd 2.5x fwd (FlashAttention-2 convention), i.e. 3.5x fwd "
                  f"in all; median of {reps} after {warmup} warm-up"]
    for label, (b, h, n, d) in shapes.items():
        check_budget(args)
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g) for _ in range(4))
        ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = math_attention(*ref_in)
        ref.backward(do.float())
        ref, ref_grads = ref.detach(), [t.grad for t in ref_in]
        flops, flash_tflops = 3.5 * 4 * b * h * n * n * d, None
        for row, backend, forced in (("sdpa-flash", "sdpa", SDPBackend.FLASH_ATTENTION), ("sdpa", "sdpa", None),
                                     ("triton", "triton", None), ("flash_attn", "flash_attn", None)):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            if backend == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
                sec.add(label, row, "not installed")
                continue
            try:
                mtx_kernels.resolve_backend(backend, leaves[0])
            except mtx_kernels.AttentionBackendError as e:
                sec.add(label, row, f"cannot run: {e}")
                continue
            if row == "sdpa":
                with contextlib.suppress(Exception):  # a private API: the name is a nicety
                    row = f"sdpa (torch picks {sdpa_names[int(torch._fused_sdp_choice(q, k, v))]})"

            def fwd_bwd(backend: str = backend, forced: Any = forced, leaves: list = leaves,
                        grad_out: torch.Tensor = do) -> torch.Tensor:
                for t in leaves:
                    t.grad = None
                with sdpa_kernel(forced) if forced is not None else contextlib.nullcontext():
                    out = mtx_kernels.attention(*leaves, causal=False, backend=backend)
                out.backward(grad_out)
                return out.detach()

            try:
                out = fwd_bwd()
                err_f = float((out.float() - ref).abs().max() / ref.abs().max())
                err_b = max(float((t.grad.float() - r).abs().max() / r.abs().max())
                            for t, r in zip(leaves, ref_grads))
                secs = median_time(fwd_bwd, dev, warmup, reps)
            except Exception as e:  # this backend's row; the others still run
                sec.fail(e, label, row)
                continue
            tflops = flops / secs / 1e12
            flash_tflops = tflops if row == "sdpa-flash" else flash_tflops
            ratio = tflops / flash_tflops if flash_tflops else None
            goal = "err " + ("ok" if max(err_f, err_b) <= tol else "MISSED")
            if backend == "triton":
                goal += ("; speed n/a (interpreter)" if dev.type == "cpu" else
                         "; speed " + ("ok" if ratio is not None and ratio >= 0.9 else "MISSED"))
            sec.add(label, row, f"{b}x{h}x{n}x{d}", err_f, err_b, secs * 1e3, tflops, ratio, goal)
        del q, k, v, do, ref, ref_in, ref_grads
        free(dev)


# -- 3. tiled CLIP loss ---------------------------------------------------------------------------------

def run_loss(args: argparse.Namespace, sec: Section) -> None:
    import torch.nn.functional as F

    from mtx_kernels.tiled_loss import DEFAULT_TILE, tiled_clip_loss

    dev, n, dim = args.dev, args.loss_n, 512
    rows, tile = max(1, n // 8), (128 if args.smoke else DEFAULT_TILE)  # smoke: still several tiles
    sec.notes.append(f"N = {n:,} columns, B = {rows:,} local rows (N/8: one rank of 8), D = {dim}, fp32 features, "
                     f"tile {tile}; memory = peak allocated during fwd+bwd minus what was allocated before")
    g = torch.Generator(device=dev).manual_seed(0)
    img_all, txt_all = (F.normalize(torch.randn(n, dim, device=dev, generator=g), dim=-1).requires_grad_()
                        for _ in range(2))
    labels = torch.arange(rows, device=dev)
    losses, peaks = {}, {}
    for variant in ("plain", "tiled"):
        check_budget(args)
        scale = torch.tensor(14.3, device=dev, requires_grad=True)

        def step(variant: str = variant, scale: torch.Tensor = scale) -> torch.Tensor:
            img_all.grad = txt_all.grad = scale.grad = None
            img, txt = img_all[:rows], txt_all[:rows]  # this rank's rows; their positives are columns 0..B-1
            if variant == "tiled":
                loss = tiled_clip_loss(img, txt_all, txt, img_all, scale, labels, tile)
            else:
                loss = (F.cross_entropy(scale * img @ txt_all.t(), labels)
                        + F.cross_entropy(scale * txt @ img_all.t(), labels)) / 2
            loss.backward()
            return loss.detach()

        step()  # warm-up (kernels, allocator)
        img_all.grad = txt_all.grad = None
        free(dev)
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        t0 = time.perf_counter()
        losses[variant] = float(step())
        sync(dev)
        secs = time.perf_counter() - t0
        peaks[variant] = peak_mib(dev, before)
        ratio = peaks["tiled"] / peaks["plain"] if variant == "tiled" and dev.type == "cuda" else "-"
        sec.add(variant, f"{rows:,}x{n:,}", peaks[variant], ratio, secs * 1e3, f"{losses[variant]:.6f}")
    rel = abs(losses["tiled"] - losses["plain"]) / abs(losses["plain"])
    sec.notes.append(f"|loss_tiled - loss_plain| / |loss_plain| = {rel:.2e} (must be <= 1e-4)")
    if not rel <= 1e-4:
        raise AssertionError(f"tiled and plain CLIP losses disagree: relative difference {rel:.2e}")


# -- 4. DALI decode -------------------------------------------------------------------------------------

def run_dali(args: argparse.Namespace, sec: Section) -> None:
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        sec.add("-", "DALI not installed")
        return
    import numpy as np
    from PIL import Image

    count, side, batch = (32, 64, 8) if args.smoke else (512, 256, 64)
    rng, jpegs = np.random.default_rng(0), []
    for _ in range(count):  # smooth colour fields plus noise: photo-like entropy, not pure noise
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BILINEAR)
        arr = (np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3))).clip(0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(buf := io.BytesIO(), format="JPEG", quality=90)
        jpegs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    batches = [jpegs[i:i + batch] for i in range(0, count, batch)]
    iters = len(batches) * (1 if args.smoke else 4)
    sec.notes.append(f"{count} JPEGs of {side}x{side} (quality 90) in memory, batches of {batch} through "
                     f"fn.external_source -> fn.decoders.image; {iters} timed batches after 2 warm-up")
    for mode in ["mixed", "cpu"] if args.dev.type == "cuda" else ["cpu"]:
        check_budget(args)

        @pipeline_def(batch_size=batch, num_threads=args.dali_threads, device_id=0 if mode == "mixed" else None,
                      prefetch_queue_depth=2)
        def decode():
            return fn.decoders.image(fn.external_source(source=itertools.cycle(batches), dtype=types.UINT8),
                                     device=mode, output_type=types.RGB)

        pipe = decode()
        pipe.build()
        for _ in range(2):
            pipe.run()
        t0 = time.perf_counter()
        for _ in range(iters):
            (out,) = pipe.run()
        out = out.as_cpu() if mode == "mixed" else out  # waits for the last decode
        secs = time.perf_counter() - t0
        sec.add(mode, iters * batch / secs, "x".join(map(str, out.as_tensor().shape())), args.dali_threads)
        del pipe, out


# -- driver ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="every code path on CPU at micro sizes (CI)")
    p.add_argument("--out", default="gpu_suite.md", help="markdown table written here (and printed)")
    p.add_argument("--budget-s", type=float, default=480.0, help="what is left when this is spent is skipped")
    p.add_argument("--sections", default="1,2,3,4", help="which sections to run, e.g. 2,3 for a rerun")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda unless --smoke")
    p.add_argument("--preset", help="training preset (default vit-b16; smoke: micro)")
    p.add_argument("--batch", type=int, help="training samples per GPU (default 256; smoke: 8)")
    p.add_argument("--steps", type=int, help="timed training steps per variant (default 20; smoke: 2)")
    p.add_argument("--warmup", type=int, help="training steps before the timed ones (default 5; smoke: 1)")
    p.add_argument("--attention", default="auto", help="model.attention of the training section")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke: aot_eager)")
    p.add_argument("--loss-n", type=int, help="columns N of the loss section (default 65536; smoke: 512)")
    p.add_argument("--dali-threads", type=int, default=4)
    args = p.parse_args(argv)
    s = args.smoke
    args.preset, args.batch = args.preset or ("micro" if s else "vit-b16"), args.batch or (8 if s else 256)
    args.steps, args.warmup = args.steps or (2 if s else 20), args.warmup or (1 if s else 5)
    args.compile_backend = args.compile_backend or ("aot_eager" if s else "inductor")
    args.loss_n = args.loss_n or (512 if s else 65536)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    args.deadline = started + args.budget_s
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    args.dev = torch.device(args.device)
    if args.dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read once, when triton is first imported
        if args.smoke:
            torch.set_num_threads(min(torch.get_num_threads(), 2))
    sections = [Section("1. Training steps (production train_step)",
                        ["variant", "tokens img/txt", "samples/s", "ms/step", "model TFLOP/s", "MFU",
                         "peak MiB", "compile s", "loss", "target (H200)"], run_training),
                Section("2. Attention backends (fwd+bwd)",
                        ["shape", "backend", "BxHxNxD", "fwd err (rel)", "bwd err (rel)", "ms", "TFLOP/s",
                         "vs sdpa-flash", "goal"], run_attention),
                Section("3. Tiled CLIP loss (fwd+bwd)",
                        ["variant", "logits BxN", "peak MiB", "tiled/plain", "ms", "loss"], run_loss),
                Section("4. DALI JPEG decode", ["decoder", "images/s", "last batch shape", "threads"], run_dali)]
    wanted = {int(x) for x in args.sections.split(",") if x.strip()}
    for sec in sections[1:] + sections[:1]:  # cheap ones first; printed in order
        if int(sec.title.split(".")[0]) not in wanted:
            sec.add("not requested (--sections)")
            continue
        t0 = time.monotonic()
        try:
            check_budget(args)
            sec.run(args, sec)
        except OutOfBudget:
            sec.add("skipped: budget")
        except Exception as e:  # one section's failure must not cost the others' numbers
            sec.fail(e)
        sec.notes.append(f"section time {time.monotonic() - t0:.1f} s")
        print(f"[gpu_suite] {sec.title}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    device = (torch.cuda.get_device_name(args.dev) if args.dev.type == "cuda"
              else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    head = ["# mtx-dist GPU suite" + (" (smoke)" if args.smoke else ""), "", f"- device: {device}",
            f"- torch {torch.__version__}, triton {version('triton')}, deepspeed {version('deepspeed')}, DALI "
            f"{version('nvidia-dali-cuda130')}, flash-attn {version('flash-attn')}, python {platform.python_version()}",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- command: `{shlex.join(['bench/gpu_suite.sh', *(sys.argv[1:] if argv is None else argv)])}`",
            f"- wall time: {time.monotonic() - started:.1f} s of a {args.budget_s:g} s budget", ""]
    table = "\n".join(head + [s.markdown() for s in sections])
    with open(args.out, "w") as f:
        f.write(table)
    print(table, flush=True)
    failed = [s.title for s in sections if s.error]
    if failed:
        print(f"[gpu_suite] sections with errors: {failed}", file=sys.stderr)
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
