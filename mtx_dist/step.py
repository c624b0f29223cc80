"""One optimizer step: micro-batches -> forward, loss, backward -> the guarded optimizer step.

:func:`train_step` is what the trainer runs and what the benchmarks time (bench/bench_step.py,
bench/bench_race.py, bench/gpu_suite.sh). Its collectives per step are the gradients' own (DeepSpeed)
plus one small all-reduce of the optimizer's (non-finite, preemption signal, checkpoint status) flags,
and its one host synchronisation is reading them (see :class:`mtx_dist.optim.GuardedAdamW`). Losses, logit
scale and gradient norm stay on the device as tensors; the trainer reads them on log steps only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mtx_dist import faults
from mtx_dist.models import patch_keep_indices
from mtx_dist.parallel import grad_norm as dense_grad_norm


@dataclass(frozen=True)
class StepSetup:
    """What stays the same from step to step."""

    engine: object  # a DeepSpeed engine around the ContrastiveModel, its optimizer a GuardedAdamW
    loss_fn: Callable
    device: torch.device
    dtype: torch.dtype  # of the model's floating inputs
    accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    dp_rank: int = 0  # tensor-parallel peers share it, hence their patch-dropout draws
    rank: int = 0  # global rank (fault injection)
    patches: int = 0  # patch tokens per full-size image (grid^2), for patch dropout
    patch_size: int = 0  # pixels per patch side, for the grid of a low-resolution step
    groups: object = None  # ParallelGroups (the ZeRO-0 gradient norm sums TP shards over the TP group)


@dataclass
class StepResult:
    losses: torch.Tensor  # (accum,) this rank's micro-batch losses, on the device
    scale: torch.Tensor  # logit scale used, on the device
    bias: torch.Tensor | None  # logit bias (SigLIP), on the device
    skipped: bool  # no rank updated: a non-finite loss or gradient somewhere (agreed by every rank)
    signal: int  # the preemption signal some rank shared with this step (0 = none; agreed by every rank)
    checkpoint: int  # the highest asynchronous-checkpoint status any rank shared (agreed by every rank)
    data_wait_s: float  # host time spent waiting for batches
    grad_norm: float | None  # ZeRO-0 only, when asked for (a log step: DeepSpeed reports none there)
    last_batch: dict


def patch_generator(setup: StepSetup, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch's patch-dropout draws: seeded by (run seed, step, micro-batch,
    data-parallel rank), so a resumed run draws what an uninterrupted one would, data-parallel ranks
    draw differently and tensor-parallel peers (same batch) alike."""
    seed = int(np.random.SeedSequence([setup.seed, step, micro, setup.dp_rank, 7]).generate_state(1)[0])
    return torch.Generator(device=setup.device).manual_seed(seed)


def train_step(setup: StepSetup, batches: Iterator[dict], step: int, patch_dropout: float = 0.0,
               signal: int = 0, want_grad_norm: bool = False,
               on_batch: Callable[[dict], None] | None = None, image_size: int = 0,
               checkpoint: int = 0) -> StepResult:
    """Optimizer step number ``step + 1`` (``step`` steps done before it) over ``setup.accum`` micro-batches
    from ``batches``. ``signal``: this rank's pending preemption signal number, shared with the step's
    collective. ``on_batch`` sees each batch as it arrives (debug key recording). ``image_size``: train
    this step at that resolution (CLIPA low-resolution training; 0 = as the batch comes). ``checkpoint``:
    this rank's asynchronous-checkpoint status (:meth:`AsyncCheckpointer.status`), shared likewise."""
    engine, optimizer = setup.engine, setup.engine.client_optimizer
    optimizer.share_signal(signal, checkpoint)
    losses, data_wait, grad_norm = [], 0.0, None
    for micro in range(setup.accum):
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        if on_batch is not None:
            on_batch(batch)
        image = batch["image"].to(setup.device, setup.dtype, non_blocking=True)
        text = batch["text"].to(setup.device, non_blocking=True)
        patches = setup.patches
        if image_size and image_size != image.shape[-1]:
            # Fewer patch tokens by shrinking the whole image (CLIPA): unlike FLIP's masking, no object
            # is ever cut out; antialiased, as a resize in the loader would be. On the device: cheap, and
            # the loader, its state and the held-out path stay at full size.
            image = F.interpolate(image, size=(image_size, image_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            patches = (image_size // setup.patch_size) ** 2
        keep = None
        if patch_dropout > 0:
            keep = patch_keep_indices(image.shape[0], patches, patch_dropout,
                                      patch_generator(setup, step, micro), setup.device)
        img, txt, scale, bias = engine(image, text, keep)
        loss = faults.poison("loss", step + 1, setup.rank, setup.loss_fn(img, txt, scale, bias))
        optimizer.request_skip(~torch.isfinite(loss.detach()))  # decided with every rank at the step
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and want_grad_norm and engine.zero_optimization_stage() == 0:
            grad_norm = dense_grad_norm(engine.module, setup.groups)
        if boundary:
            optimizer.expect_step()
        engine.step()
        losses.append(loss.detach())
    skipped, agreed, saving = optimizer.skipped_last, optimizer.agreed_signal, optimizer.agreed_checkpoint
    optimizer.end_step()
    return StepResult(torch.stack(losses), scale.detach(), None if bias is None else bias.detach(), skipped, agreed,
                      saving, data_wait, grad_norm, batch)
