"""Process group, device and the DeepSpeed engine around a plain model.

DeepSpeed owns ZeRO, mixed precision, gradient clipping and accumulation, and its checkpoint
shards; this module only translates our config into DeepSpeed's and hides its CPU quirks.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from launchers import DistEnv, discover
from mtx_dist.config import Config
from mtx_dist.optim import build_optimizer, build_scheduler



@dataclass(frozen=True)
class Runtime:
    env: DistEnv
    device: torch.device
    dtype: torch.dtype  # dtype of the model's floating inputs

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device = 'cuda' but torch sees no CUDA device")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (binds the module object patched below)

    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    if device.type == "cpu":
        # The CPU backend JIT-compiles a shared-memory allreduce op (~70 s, needs a compiler) the
        # first time a process group starts; gloo does the same job for us, so skip the build.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def setup_runtime(cfg: Config) -> Runtime:
    """Discover the launch environment, pick the device, start the process group."""
    env = discover()
    device = resolve_device(cfg.run.device, env.local_rank)
    deepspeed = _import_deepspeed(device)
    env.export()
    import torch.distributed as dist
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False, verbose=False,
            timeout=datetime.timedelta(seconds=cfg.parallel.dist_timeout_s), rank=env.rank,
            world_size=env.world_size,
        )
    dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32
    return Runtime(env, device, dtype)


def deepspeed_config(cfg: Config) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,  # explicit: DeepSpeed's default is 1.0, not off
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.parallel.precision == "bf16"},
        # Our optimizer is torch's AdamW with weight-decay groups (no fused-Adam JIT build).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: nn.Module, runtime: Runtime):
    """Wrap ``model`` (already on ``runtime.device``) in a DeepSpeed engine with our optimizer/schedule."""
    deepspeed = _import_deepspeed(runtime.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    return engine


def global_grad_norm(engine) -> float | None:
    """Gradient norm of the last optimizer step (before clipping)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def local_grad_norm(model: nn.Module) -> float:
    """Norm of the gradients held in ``.grad`` (ZeRO stage 0, where DeepSpeed does not report it)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full model state dict as float32 CPU tensors, on every rank (gathers ZeRO-3 partitions)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
