"""Process group, device and the DeepSpeed engine around a plain model.

DeepSpeed owns ZeRO, mixed precision, gradient clipping and accumulation, and its checkpoint
shards; this module only translates our config into DeepSpeed's and hides its CPU quirks.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from mtx_launchers import DistEnv, RendezvousError, discover
from mtx_dist.deepspeed_compat import mlflow_hidden_from_autotuner, skip_shm_op_build, skip_single_rank_allreduce
from mtx_dist.devices import resolve_device
from mtx_dist.config import Config, ConfigError
from mtx_dist.loss import logit_init
from mtx_dist.models import ContrastiveModel
from mtx_dist.models.embedding import enable_grad_recycling
from mtx_dist.optim import build_optimizer, build_scheduler
from mtx_dist.parallel import (DeepSpeedMpu, ParallelGroups, ParallelLayoutError, gather_tensor_parallel, init_groups,
                               parallelize, shard_tensor)
from mtx_dist.torch_compat import optimizer_without_dynamo


@dataclass(frozen=True)
class Runtime:
    env: DistEnv
    device: torch.device
    dtype: torch.dtype  # dtype of the model's floating inputs
    groups: ParallelGroups

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with mlflow_hidden_from_autotuner():
        import deepspeed

    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    if device.type == "cpu":
        skip_shm_op_build()
    return deepspeed


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
KEPT_BLOCK = 32 << 20  # CPU training keeps freed blocks up to this size in the process
_KEEPING_FREED = False  # whether keep_freed_memory_in_process set it in this process


def keep_freed_memory_in_process() -> bool:
    """CPU training: let glibc keep freed blocks of up to 32 MiB for reuse instead of unmapping them.

    A step allocates and frees the same activation and gradient buffers every time; with glibc's
    defaults, blocks above its (adaptive) mmap threshold go back to the kernel when freed and page-
    fault back in on next use: about 4 % of a tiny-preset step on a 2-core machine (bench/bench_race.py
    runs, 2026-12-02). Torch has no caching allocator on the CPU, hence this. No-op without glibc."""
    global _KEEPING_FREED
    libc = _glibc()
    if libc is None:
        return False
    _KEEPING_FREED = bool(libc.mallopt(M_MMAP_THRESHOLD, KEPT_BLOCK) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
                          and libc.mallopt(M_TOP_PAD, 64 << 20))
    return _KEEPING_FREED


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def freed_blocks_returned(device: torch.device):
    """While a CPU run builds its model: blocks from 1 MiB up are mapped on their own, so each whole
    parameter the replay frees goes back to the kernel at once. Under the training's 32 MiB threshold
    they stay in the heap, which the slices and partitions kept between them fragment: a vit-b16 rank
    under ZeRO-3 over 4 ranks peaked 233-442 MiB above its start instead of 256-262 MiB (143 kept)."""
    libc = _glibc() if device.type == "cpu" and _KEEPING_FREED else None  # else glibc's own adaptive threshold
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, KEPT_BLOCK)


def setup_runtime(cfg: Config) -> Runtime:
    """Discover the launch environment, pick the device, start the process group and the TP/DP groups."""
    env = discover()
    device = resolve_device(cfg.run.device, env.local_rank)
    if device.type == "cpu" and sys.platform == "linux":
        keep_freed_memory_in_process()
    torch.set_float32_matmul_precision(cfg.parallel.matmul_precision)
    deepspeed = _import_deepspeed(device)
    env.export()
    import torch.distributed as dist
    if not dist.is_initialized():
        try:  # the TCPStore rendezvous waits parallel.dist_timeout_s for missing peers, not torch's 30 min
            deepspeed.init_distributed(
                dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False, verbose=False,
                timeout=datetime.timedelta(seconds=cfg.parallel.dist_timeout_s), rank=env.rank,
                world_size=env.world_size,
            )
        except dist.DistError as e:
            raise RendezvousError(
                f"rank {env.rank} of {env.world_size} (from {env.source}) could not form the process group at "
                f"{env.master_addr}:{env.master_port} within parallel.dist_timeout_s = "
                f"{cfg.parallel.dist_timeout_s:g} s: {str(e).splitlines()[0].rstrip('.')}. Check that every rank "
                f"was started and can reach MASTER_ADDR") from None
    try:
        groups = init_groups(cfg.parallel.tensor_parallel, cfg.parallel.dist_timeout_s)
    except ParallelLayoutError:
        raise ConfigError(f"config key 'parallel.tensor_parallel' = {cfg.parallel.tensor_parallel}: must divide the "
                          f"world size ({env.world_size} processes)") from None
    dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32
    return Runtime(env, device, dtype, groups)


def build_model(cfg: Config, runtime: Runtime) -> nn.Module:
    """The contrastive model on the runtime's device, tensor-parallel and checkpointed as configured.

    Seeded identically on every rank, so any TP size starts from the same weights. The model is
    built on the meta device and its initialisation replayed one parameter at a time
    (:mod:`mtx_dist.models.deferred`): bit for bit the weights of an eager seeded build, but a rank
    holds only its TP slices and one full parameter at a time, never the whole fp32 model. With
    ``model.init_from`` every rank loads the same OpenCLIP checkpoint into a whole model instead
    (raises OpenClipImportError when it does not fit).
    """
    from mtx_dist.models.deferred import materialize, place_into, record

    torch.manual_seed(cfg.run.seed)
    scale_init, bias_init = logit_init(cfg.loss.kind)

    def build() -> ContrastiveModel:
        return ContrastiveModel(cfg.model.spec, cfg.model.attention, scale_init, bias_init)

    groups, device = runtime.groups, runtime.device
    if cfg.model.init_from:  # into the whole model, before TP slices it and DeepSpeed partitions it
        from mtx_dist.interop.openclip import load_into
        model = build()
        load_into(model, cfg.model.init_from, cfg.model.spec, cfg.model.preset)
        return parallelize(model.to(device), groups, cfg.parallel.activation_checkpointing)
    model, calls = record(build)
    shapes = {n: (p.shape, p.dtype) for n, p in model.named_parameters()}  # before TP swaps layers
    parallelize(model, groups, cfg.parallel.activation_checkpointing)
    place = place_into(model, device, lambda n, t: shard_tensor(n, t, groups.tp_rank, groups.tp_size))
    if cfg.parallel.zero_stage == 3:
        place = partition_as_placed(place, model, cfg, runtime)
    with freed_blocks_returned(device):
        materialize(calls, shapes, place)
    return model


def partition_as_placed(place, model: nn.Module, cfg: Config, runtime: Runtime):
    """ZeRO-3: wrap ``place`` so that each parameter is partitioned over the data-parallel group as soon as
    its values are in, so a rank never holds more than its partitions plus one whole parameter (ViT-bigG-14
    at ZeRO-3 over 64 ranks: ~160 MB of its 10 GB of fp32 weights instead of all of them; with TP > 1
    each tensor-parallel slice is allocated only when its values are in, then partitioned). The calls are
    those DeepSpeed's engine makes itself when it is given a model that is not partitioned yet
    (``zero.Init(module=...)`` for the first parameter, ``convert_to_zero_parameters`` for the others,
    same config, group and mpu), one parameter at a time instead of all at once; the engine then finds
    every parameter partitioned and leaves them as they are. Under bf16 the parameter is cast first, as
    the engine would cast the whole module before partitioning it."""
    deepspeed = _import_deepspeed(runtime.device)
    modules = dict(model.named_modules())
    dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else None
    mpu = DeepSpeedMpu() if runtime.groups.tp else None
    first: list[nn.Parameter] = []

    def place_and_partition(name: str, full: torch.Tensor) -> None:
        place(name, full)
        owner, _, attr = name.rpartition(".")
        param = getattr(modules[owner], attr)
        if dtype is not None and param.is_floating_point():
            param.data = param.data.to(dtype)
        if first:
            first[0].convert_to_zero_parameters(param_list=[param])
            return
        holder = nn.Module()  # zero.Init converts a module's parameters: one holding this one alone
        holder.register_parameter("p", param)
        deepspeed.zero.Init(module=holder, data_parallel_group=mpu.get_data_parallel_group() if mpu else None,
                            dtype=param.dtype, config_dict_or_path=deepspeed_config(cfg), mpu=mpu)
        first.append(param)

    return place_and_partition


def optimizer_clips(cfg: Config) -> bool:
    """Whether our optimizer clips the gradients instead of DeepSpeed: ZeRO-0 without tensor parallelism
    and without DeepSpeed's bf16 optimizer. There DeepSpeed would compute the global norm once more,
    parameter by parameter, and all-reduce it over the data-parallel ranks (whose reduced gradients are
    equal), beside the norm the optimizer's non-finite check computes anyway: one pass over every
    gradient and one collective per step less (a ~3 % faster ``tiny`` step on a CPU)."""
    p = cfg.parallel
    return cfg.optim.grad_clip > 0 and p.zero_stage == 0 and p.tensor_parallel == 1 and p.precision != "bf16"


def deepspeed_config(cfg: Config, load_universal: bool = False) -> dict:
    p = cfg.parallel
    zero = {"stage": p.zero_stage}
    if p.zero_stage:
        zero.update(overlap_comm=p.overlap_comm, contiguous_gradients=True, reduce_bucket_size=p.reduce_bucket_size,
                    allgather_bucket_size=p.allgather_bucket_size)
    if p.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=p.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=p.stage3_param_persistence_threshold)
    amp = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}} if p.precision == "amp_bf16" else {}
    # resuming partitioned states on another data-parallel size (mtx_dist.checkpoint.load(universal=True))
    universal = {"checkpoint": {"load_universal": True}} if load_universal else {}
    return {
        **amp, **universal,  # DeepSpeed runs the engine's forward under torch.autocast (and reduces Linear gradients in bf16)
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        # explicit: DeepSpeed's default is 1.0, not off; 0 where our optimizer clips instead
        "gradient_clipping": 0.0 if optimizer_clips(cfg) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.parallel.precision == "bf16"},
        # Our optimizer is torch's AdamW with weight-decay groups (no fused-Adam JIT build).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: nn.Module, runtime: Runtime, load_universal: bool = False):
    """Wrap ``model`` (already parallelized, on ``runtime.device``) in a DeepSpeed engine with our
    optimizer and schedule. With TP the mpu makes ZeRO partition over the data-parallel group only
    and count each TP shard once in the gradient norm. ``load_universal``: the engine will load a
    DeepSpeed universal checkpoint (a resume that reshards partitioned states)."""
    deepspeed = _import_deepspeed(runtime.device)
    if not cfg.run.compile:
        optimizer_without_dynamo()  # 0.85 s of start-up (mtx_dist.torch_compat)
    optimizer = build_optimizer(model, cfg.optim)
    if optimizer_clips(cfg):
        optimizer.clip_norm = cfg.optim.grad_clip
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, load_universal),
                                           mpu=DeepSpeedMpu() if runtime.groups.tp else None)
    if runtime.groups.dp_size == 1 and cfg.parallel.zero_stage == 0:
        # One data-parallel rank: DeepSpeed's dense all-reduce would still flatten every gradient into
        # one buffer, "reduce" it over a group of one and copy it back (a fifth of a tiny-preset CPU
        # step, bench/profile_step.py). Over one rank it changes nothing, so it is not run.
        skip_single_rank_allreduce(engine)
    if (runtime.env.world_size == 1 and cfg.parallel.zero_stage == 0 and not cfg.run.compile
            and cfg.parallel.precision != "bf16" and runtime.device.type == "cpu"):
        # Nothing but autograd and our optimizer touches the gradients here: the token embedding's dense
        # gradient reuses its tensor instead of a 25 MB zero fill per step (mtx_dist.models.embedding)
        enable_grad_recycling(engine.module, optimizer)
    if cfg.run.compile:
        compile_engine(engine, cfg)
    return engine


def compile_engine(engine, cfg: Config) -> None:
    """torch.compile the model in place inside the engine (parameter names, hence checkpoints, unchanged).
    Trimmed text comes in multiples of 8, and the tails of FLIP and of low-resolution training change
    the patch count once each: each shape gets its own static graph (marked dynamic, the text length
    would cost a symbolic recompile anyway), so the recompile limit is raised to the number of shapes a
    run can meet rather than letting torch fall back to eager silently."""
    import torch._dynamo

    from mtx_dist.data import text_pad_multiple
    spec, multiple = cfg.model.spec, text_pad_multiple(cfg)
    text_shapes = -(-spec.text.context_length // multiple) if multiple else 1
    image_shapes = (2 if cfg.model.patch_dropout else 1) * (2 if cfg.model.train_image_size else 1)
    shapes = text_shapes * image_shapes + 2  # + held-out eval, last partial batch
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
    engine.compile(compile_kwargs={"dynamic": False})


def global_grad_norm(engine) -> float | None:
    """Gradient norm of the last optimizer step (before clipping)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def consolidated_state_dict(engine, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The full, unsharded model state dict as float32 CPU tensors, on every rank.

    A collective: gathers ZeRO-3 partitions over the data-parallel group, then TP shards over the
    tensor-parallel group. Keys are those of the unparallelized model.
    """
    module = engine.module

    def full() -> dict[str, torch.Tensor]:
        local = {k: v.detach().float() for k, v in module.state_dict().items()}
        return {k: v.cpu().clone() for k, v in gather_tensor_parallel(local, groups).items()}

    if engine.zero_optimization_stage() == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return full()
    return full()
