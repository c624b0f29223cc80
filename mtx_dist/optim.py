"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mtx_dist.config import OptimConfig


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, embeddings of tokens/positions/class and the temperature are not decayed
    (decaying them shrinks features and the logit scale rather than regularizing)."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf in ("cls_token", "pos_embed", "logit_scale") or "token_embedding" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps skipped for non-finite values."""


class GuardedAdamW(torch.optim.AdamW):
    """AdamW whose update is skipped on every rank at once when any rank's gradients are non-finite
    or any rank asked for it (``request_skip``, e.g. for a non-finite loss).

    The check lives in the optimizer because that is the one place every ZeRO stage funnels
    through with the final gradients (DeepSpeed calls it on each rank's fp32 partitions after
    reduction and clipping); a skipped update leaves parameters and optimizer state untouched, and
    DeepSpeed then copies the unchanged partitions back and clears the gradients as usual. The
    decision costs one all-reduce of a flag and one device sync per optimizer step. ``overflow`` is
    DeepSpeed's own flag for a skipped update: with it set, DeepSpeed does not advance the LR
    schedule either, as when its ZeRO-1/2 optimizer skips non-finite gradients by itself (in that
    case this ``step`` is never called, so ``expect_step`` presumes a skip until ``step`` runs).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._request: torch.Tensor | None = None
        self.skipped_last = False
        self.overflow = False

    def expect_step(self) -> None:
        """Before the engine's optimizer step: it counts as skipped unless :meth:`step` applies it."""
        self.skipped_last = True

    def end_step(self) -> None:
        """After the engine's optimizer step: forget this step's skip requests."""
        self._request = None

    def request_skip(self, flag: torch.Tensor) -> None:
        """OR a (device) boolean into the next step's skip decision, without a host sync."""
        flag = flag.detach().reshape(()).to(torch.bool)
        self._request = flag if self._request is None else self._request | flag

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else self.param_groups[0]["params"][0].device
        bad = torch.zeros((), device=device)
        if grads:  # a NaN or inf anywhere makes the sum non-finite
            bad += (~torch.stack([g.float().sum() for g in grads]).sum().isfinite()).float()
        if self._request is not None:
            bad += self._request.to(device).float()
            self._request = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.skipped_last = self.overflow = bool(bad.item() > 0)
        if self.skipped_last:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> GuardedAdamW:
    return GuardedAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    horizon = cfg.decay_steps or total_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
