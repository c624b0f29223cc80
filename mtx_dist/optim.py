"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mtx_dist.config import OptimConfig
from mtx_dist.errors import TrainingDiverged  # noqa: F401  (raised by the trainer; re-exported)
from mtx_dist.torch_compat import adam_step


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, embeddings of tokens/positions/class and the temperature are not decayed
    (decaying them shrinks features and the logit scale rather than regularizing)."""
    leaf = name.rsplit(".", 1)[-1]
    ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partitioned parameter's own shape
    return ndim < 2 or leaf in ("cls_token", "pos_embed", "logit_scale") or "token_embedding" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW whose update is skipped on every rank at once when any rank's gradients are non-finite
    or any rank asked for it (``request_skip``, e.g. for a non-finite loss).

    The check lives in the optimizer because that is the one place every ZeRO stage funnels
    through with the final gradients (DeepSpeed calls it on each rank's fp32 partitions after
    reduction and clipping); a skipped update leaves parameters and optimizer state untouched, and
    DeepSpeed then copies the unchanged partitions back and clears the gradients as usual. ``overflow``
    is DeepSpeed's own flag for a skipped update: with it set, DeepSpeed does not advance the LR
    schedule either, as when its ZeRO-1/2 optimizer skips non-finite gradients by itself (in that
    case this ``step`` is never called, so ``expect_step`` presumes a skip until ``step`` runs).

    The step's one small collective: (non-finite, preemption signal, checkpoint status) all-reduced with
    MAX, so the preemption agreement and the progress of an asynchronous checkpoint (``share_signal``
    before, ``agreed_signal`` / ``agreed_checkpoint`` after) cost no collective of their own. Reading them
    is the step's one host synchronisation: DeepSpeed needs ``overflow`` as a Python bool before it
    advances the LR schedule.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # > 0: clip the gradients to this global norm here, with the norm the non-finite check computes
        # anyway (set by the engine where it replaces DeepSpeed's clipping: see mtx_dist.engine.optimizer_clips)
        self.clip_norm = 0.0
        self._request: torch.Tensor | None = None
        self._signal = 0
        self.skipped_last = False
        self.overflow = False
        self.agreed_signal = 0  # the highest signal number any rank shared for the last step (0 = none)
        self._checkpoint = 0
        # the highest checkpoint status any rank shared (see mtx_dist.async_checkpoint); a step decided
        # without the collective (DeepSpeed skipped it by itself) reports UNDECIDED: "still busy"
        self.agreed_checkpoint = 0
        self._groups: list[dict] | None = None  # every param group, while an engine step is expected
        self._decided: bool | None = None  # this engine step's skip decision, once made

    def expect_step(self) -> None:
        """Before the engine's optimizer step: it counts as skipped unless :meth:`step` applies it.

        ZeRO calls :meth:`step` once per parameter group (or sub-group), each time with ``param_groups``
        narrowed to that group: the first call decides for the whole engine step, over every group's
        gradients (their partitions are all in place by then), and the later calls reuse the decision,
        so no group is updated when another is skipped and the step has one collective."""
        self.skipped_last = True
        self.agreed_signal = 0
        self.agreed_checkpoint = UNDECIDED
        self._groups, self._decided = self.param_groups, None

    def end_step(self) -> None:
        """After the engine's optimizer step: forget this step's skip requests and decision."""
        self._request = None
        self._signal = self._checkpoint = 0
        self._groups = self._decided = None

    def request_skip(self, flag: torch.Tensor) -> None:
        """OR a (device) boolean into the next step's skip decision, without a host sync."""
        flag = flag.detach().reshape(()).to(torch.bool)
        self._request = flag if self._request is None else self._request | flag

    def share_signal(self, signum: int, checkpoint: int = 0) -> None:
        """Send this rank's preemption signal number (0 = none) and checkpoint status (0 = nothing in
        flight) with the next step's collective."""
        self._signal, self._checkpoint = int(signum), int(checkpoint)

    @torch.no_grad()
    def step(self, closure=None):
        if self._decided is None:
            self._decided = self._decide(self._groups or self.param_groups)
            if self._groups is None:  # called outside an engine step (expect_step): decide every call
                skipped, self._decided = self._decided, None
                if skipped:
                    return None
                return adam_step(self, closure)
        if self._decided:
            return None
        return adam_step(self, closure)

    def _decide(self, groups: list[dict]) -> bool:
        """Skip this step? Agreed by every rank through the step's one collective."""
        grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else groups[0]["params"][0].device
        flags = torch.zeros(3, device=device)
        flags[1], flags[2] = self._signal, self._checkpoint
        norm = None
        if grads:  # a NaN or inf anywhere makes a norm, hence the global norm, non-finite
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            flags[0] = (~norm.isfinite()).float()
        if self._request is not None:
            flags[0] += self._request.to(device).float()
            self._request = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, signum, checkpoint = flags.tolist()
        self.agreed_signal, self.agreed_checkpoint = int(signum), int(checkpoint)
        self.skipped_last = self.overflow = bad > 0
        if self.clip_norm and norm is not None and not self.skipped_last:
            # DeepSpeed's rule (deepspeed.runtime.utils.clip_grad_norm_): scale by max_norm / (norm + 1e-6)
            # when that is below 1. The norm is this rank's, which is the global one where the engine
            # hands clipping to this optimizer (every data-parallel rank holds the same reduced gradients).
            torch._foreach_mul_(grads, (self.clip_norm / (norm + 1e-6)).clamp(max=1.0))
        return self.skipped_last


UNDECIDED = 1  # the checkpoint status of a step decided without the collective: "busy", nothing advances


# AdamW kernels measured on a 2-core AVX-512 CPU (torch 2.13, preset `tiny`, 8.0 M parameters, see
# docs/BENCHMARKS.md): fused is fastest there as on CUDA, so auto picks it on both.
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> GuardedAdamW:
    impl = IMPLEMENTATIONS["fused" if cfg.implementation == "auto" else cfg.implementation]
    return GuardedAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                        **impl)


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
