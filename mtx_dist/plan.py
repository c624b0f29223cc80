"""``mtx-dist plan``: per-GPU memory, step time and scaling of a configured run, before booking nodes.

Torch-free arithmetic over the run's config (geometry, batch, precision, ZeRO stage, TP, activation
checkpointing, loss tiling) and a device description. What each number assumes:

Memory per GPU (bytes):
- **Model states** follow DeepSpeed as measured by ``bench/bench_zero_memory.py``: per parameter
  held by a rank (its TP shard), fp32 keeps weights 4 + gradients 4 + Adam 8 at ZeRO-0, and from
  ZeRO-1 on an fp32 master copy too (12 optimizer bytes, partitioned over the data-parallel group
  d); bf16 keeps weights 2 + gradients 2 + master and Adam 12. ZeRO-2 also partitions the
  gradients, ZeRO-3 the weights.
- **Activations** per transformer layer, micro-batch b, tokens s, width h, MLP ratio r, bytes e of
  the compute dtype: the block input, both LayerNorm inputs and outputs, q, k, v, the attention
  output and the MLP's two hidden tensors, (8 + 2r) s b h e (Korthikanti et al. 2022 count the same
  tensors, plus dropout masks we do not have); the pieces inside tensor-parallel regions
  ((4 + 2r) s b h e) divide by the TP size. Attention is fused (flash/SDPA: only a log-sum-exp per
  row and head). The last layer runs its attention output, projection and MLP for the pooled token
  alone: (3 s + 1 + 2r) b h e inside, (2 s + 2) b h e outside. With activation checkpointing, each
  layer keeps its input and one layer at a time is rebuilt. The text tower is counted at its full
  context (trimmed batches only use less).
- **Contrastive logits**: B x N fp32 logits, their softmax and gradient per direction (local loss,
  N the global batch), or a B x tile block when the loss is tiled.
- **Buffers**: DeepSpeed's gradient reduce bucket (doubled with overlap_comm) and parameter
  all-gather / ZeRO-3 prefetch buckets, each at most the rank's parameters; on a GPU also
  ``RUNTIME_GIB`` for the CUDA context, NCCL and allocator slack.

Step time = compute at ``mfu`` of the device's dense peak (model FLOPs of mtx_dist.flops; one
more forward with activation checkpointing) + tensor-parallel all-reduces (two per layer forward,
two backward, on the node's NVLink; the last layer's for one token, except the backward one at its
qkv input) + the loss's feature all-gather and its backward + the
data-parallel gradient (and ZeRO-1/2/3 parameter) traffic, of which as much as the backward lasts
is hidden when ``parallel.overlap_comm`` is on. Collectives are rings: 2(n-1)/n of the bytes for an
all-reduce, (n-1)/n for an all-gather or reduce-scatter, at the slowest link they cross. The volume
per step is calibrated against every collective of a real training step on gloo
(tests/test_plan.py, within 10 %); on gloo, which has no reduce-scatter, DeepSpeed's ZeRO-1/2 and our
loss's backward all-reduce instead (``Layout.backend``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mtx_dist.flops import PEAK_TFLOPS, train_flops_per_sample
from mtx_dist.models.presets import ModelSpec

GIB = 2 ** 30
MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed's stage3_max_live_parameters default
RUNTIME_GIB = 2.0  # CUDA context, NCCL buffers and caching-allocator slack per GPU (not on CPU)


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_tflops: float  # dense, at the run's precision
    nvlink_gbs: float = 0.0  # achievable all-reduce bus bandwidth inside a node, GB/s
    per_node: int = 8


# Memory in GiB as the driver reports it (the datasheets' "80 GB" is 79.6 GiB usable, "141 GB" 140.4);
# NVLink bus bandwidth is what NCCL's all_reduce_perf reaches on 8-GPU nodes (about 80 % of the
# one-way NVLink bandwidth: 450 GB/s on H100/H200, 300 GB/s on A100).
DEVICES = {
    "H100": (79.6, 360.0), "H200": (140.4, 360.0), "GH200": (94.5, 360.0), "A100": (79.2, 240.0),
    "A100-40GB": (39.4, 240.0), "H100 PCIe": (79.6, 100.0),
}


def device(name: str, precision: str) -> Device:
    try:
        memory, nvlink = DEVICES[name]
    except KeyError:
        raise KeyError(f"unknown GPU {name!r}: use one of {', '.join(DEVICES)}, or give --gpu-memory-gib and "
                       "--peak-tflops") from None
    table = PEAK_TFLOPS["fp32" if precision == "fp32" else "bf16"]
    return Device(name, memory, table[name.replace("-40GB", "")], nvlink)


# -- parameters ---------------------------------------------------------------------------------

def _block_params(width: int, mlp_ratio: float) -> tuple[int, int]:
    """(parameters split by tensor parallelism, replicated ones) of one transformer block."""
    hidden = int(width * mlp_ratio)
    split = (3 * width * width + 3 * width) + width * width + (width * hidden + hidden) + hidden * width
    return split, 4 * width + 2 * width  # LayerNorms and the two output projections' biases are replicated


def param_counts(spec: ModelSpec) -> dict[str, int]:
    """Parameters of our model (== OpenCLIP's for its geometries), by tower, and how many TP splits."""
    v, t, e = spec.vision, spec.text, spec.embed_dim
    v_split, v_rep = (n * v.layers for n in _block_params(v.width, v.mlp_ratio))
    t_split, t_rep = (n * t.layers for n in _block_params(t.width, t.mlp_ratio))
    image_rest = 3 * v.patch_size ** 2 * v.width + v.width + v.tokens * v.width + 4 * v.width + v.width * e
    text_rest = t.vocab_size * t.width + t.context_length * t.width + 2 * t.width + t.width * e
    image, text = v_split + v_rep + image_rest, t_split + t_rep + text_rest
    return {"image": image, "text": text, "total": image + text + 1, "tp_split": v_split + t_split}


# -- memory -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    gpus: int
    tp: int
    zero_stage: int
    micro_batch: int  # per data-parallel rank and micro-step
    grad_accum: int
    precision: str  # fp32, bf16, amp_bf16
    activation_checkpointing: bool
    tile_size: int = 0
    local_loss: bool = True
    overlap_comm: bool = True
    reduce_bucket: int = 500_000_000
    allgather_bucket: int = 500_000_000
    prefetch_bucket: int = 50_000_000
    backend: str = "nccl"  # gloo (CPU) has no reduce-scatter: the loss's backward all-reduces instead

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp


def model_state_bytes(params: int, stage: int, dp: int, precision: str) -> dict[str, float]:
    """Parameters, gradients and optimizer state of ``params`` parameters on one rank."""
    weight = grad = 2 if precision == "bf16" else 4
    if stage == 0 and precision != "bf16":
        optim = 8.0  # torch AdamW: two moments, no master copy
    else:
        optim = 12.0 / (dp if stage >= 1 else 1)  # fp32 master + two moments (DeepSpeed keeps a master in fp32 too)
    return {"parameters": params * weight / (dp if stage >= 3 else 1),
            "gradients": params * grad / (dp if stage >= 2 else 1),
            "optimizer": params * optim}


def _tower_activations(s: int, h: int, heads: int, layers: int, r: float, b: int, e: int, tp: int,
                       checkpointing: bool) -> float:
    def layer(q: int) -> float:
        """One layer whose attention output, projection and MLP run for ``q`` tokens (s; the last
        layer only for the pooled one): q, k, v of every token, the attention output and the MLP's two
        hidden tensors inside the TP region; the block input, the first LayerNorm's output, the
        residual and the second LayerNorm's output outside it; the fused attention's fp32 log-sum-exp."""
        inside = (3 * s + q + 2 * r * q) * b * h * e / tp
        outside = (2 * s + 2 * q) * b * h * e
        return inside + outside + 4 * heads * q * b / tp

    if checkpointing:
        return layers * s * b * h * e + layer(s if layers > 1 else 1)
    return (layers - 1) * layer(s) + layer(1)


def activation_bytes(spec: ModelSpec, lay: Layout) -> float:
    e = 4 if lay.precision == "fp32" else 2
    v, t, b = spec.vision, spec.text, lay.micro_batch
    image = _tower_activations(v.tokens, v.width, v.heads, v.layers, v.mlp_ratio, b, e, lay.tp,
                               lay.activation_checkpointing) + b * 3 * v.image_size ** 2 * e
    text = _tower_activations(t.context_length, t.width, t.heads, t.layers, t.mlp_ratio, b, e, lay.tp,
                              lay.activation_checkpointing)
    return image + text


def logits_bytes(lay: Layout) -> float:
    rows = lay.micro_batch if lay.local_loss else lay.micro_batch * lay.dp
    cols = lay.micro_batch * lay.dp
    if lay.tile_size:
        cols = min(cols, lay.tile_size)
    return 2 * 3 * rows * cols * 4  # both directions: logits, softmax, gradient (fp32)


def memory(spec: ModelSpec, lay: Layout, on_gpu: bool = True) -> dict[str, float]:
    """Bytes per GPU by component (``total`` included)."""
    counts = param_counts(spec)
    local = counts["total"] - counts["tp_split"] + counts["tp_split"] / lay.tp
    out = model_state_bytes(local, lay.zero_stage, lay.dp, lay.precision)
    out["activations"] = activation_bytes(spec, lay)
    out["logits"] = logits_bytes(lay)
    e = 2 if lay.precision == "bf16" else 4
    buffers = 0.0
    if lay.zero_stage >= 1:
        buffers += min(lay.reduce_bucket, local) * e * (2 if lay.overlap_comm else 1)
        buffers += min(lay.prefetch_bucket if lay.zero_stage == 3 else lay.allgather_bucket, local) * e
    out["buffers"] = buffers + (RUNTIME_GIB * GIB if on_gpu else 0.0)
    out["total"] = sum(out.values())
    return out


# -- time ---------------------------------------------------------------------------------------

def _ring(kind: str, n: int, nbytes: float, gbs: float) -> float:
    """Seconds of one ring collective of ``nbytes`` over ``n`` ranks at ``gbs`` GB/s bus bandwidth."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    return factor * nbytes / (gbs * 1e9)


def comm_bytes(spec: ModelSpec, lay: Layout) -> dict[str, float]:
    """Bytes each rank sends per optimizer step, by collective (ring algorithms)."""
    counts = param_counts(spec)
    local = counts["total"] - counts["tp_split"] + counts["tp_split"] / lay.tp
    e = 4 if lay.precision == "fp32" else 2
    v, t, b = spec.vision, spec.text, lay.micro_batch
    ar = lambda n: 2 * (n - 1) / n if n > 1 else 0.0  # noqa: E731
    ag = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731
    per_layer = 4 + (2 if lay.activation_checkpointing else 0)  # forward 2, backward 2, recompute 2
    # A tower's last block runs its output projection and MLP for the pooled token alone: of its
    # all-reduces only the backward one at the qkv input carries every token.
    tp = sum(((layers - 1) * per_layer * s + s + (per_layer - 1)) * ar(lay.tp) * b * h * e
             for s, h, layers in ((v.tokens, v.width, v.layers), (t.context_length, t.width, t.layers)))
    # both towers' features of every micro-step gathered, and their gradients reduce-scattered back
    back = ar(lay.dp) if lay.backend == "gloo" else ag(lay.dp)
    loss = 2 * (ag(lay.dp) + back) * (b * lay.dp) * spec.embed_dim * 4
    grad_e = 2 if lay.precision == "bf16" else 4
    if lay.zero_stage == 0:  # the gradients all-reduced
        dp = ar(lay.dp)
    elif lay.zero_stage in (1, 2):  # gradients reduced to their owners (gloo: all-reduced), parameters all-gathered
        dp = (ar(lay.dp) if lay.backend == "gloo" else ag(lay.dp)) + ag(lay.dp)
    else:  # ZeRO-3: parameters gathered for the forward, again for the backward once they exceed DeepSpeed's
        # stage3_max_live_parameters (1e9; below it they stay gathered), gradients reduce-scattered
        dp = (3 if local > MAX_LIVE_PARAMETERS else 2) * ag(lay.dp)
    dp *= local * grad_e
    return {"tensor_parallel": tp * lay.grad_accum, "loss_gather": loss * lay.grad_accum, "data_parallel": dp}


def step_time(spec: ModelSpec, lay: Layout, dev: Device, mfu: float, inter_gbs: float) -> dict[str, float]:
    """Seconds per optimizer step by part, ``total`` included."""
    flops = train_flops_per_sample(spec) * lay.global_batch / lay.gpus
    if lay.activation_checkpointing:
        flops *= 4 / 3
    compute = flops / (dev.peak_tflops * 1e12 * mfu)
    traffic = comm_bytes(spec, lay)
    one_node = lay.gpus <= dev.per_node
    dp_gbs = dev.nvlink_gbs if one_node else min(dev.nvlink_gbs or inter_gbs, inter_gbs)
    tp = traffic["tensor_parallel"] / (dev.nvlink_gbs * 1e9) if lay.tp > 1 else 0.0
    loss = traffic["loss_gather"] / (dp_gbs * 1e9) if lay.dp > 1 else 0.0
    dp = traffic["data_parallel"] / (dp_gbs * 1e9) if lay.dp > 1 else 0.0
    hidden = 2 / 3 * compute if lay.overlap_comm else 0.0  # the backward's share of the compute
    exposed = max(0.0, dp - hidden)
    return {"compute": compute, "tensor_parallel": tp, "loss_gather": loss, "data_parallel": exposed,
            "total": compute + tp + loss + exposed}


def plan(spec: ModelSpec, lay: Layout, dev: Device, mfu: float = 0.4, inter_gbps: float = 400.0,
         on_gpu: bool = True) -> dict:
    """The planner's answer for one layout (the keys of ``mtx-dist plan --json``)."""
    inter_gbs = inter_gbps / 8 * 0.8  # Gb/s per GPU -> achievable GB/s (about 80 % on InfiniBand)
    counts, mem = param_counts(spec), memory(spec, lay, on_gpu)
    t = step_time(spec, lay, dev, mfu, inter_gbs)
    single = step_time(spec, dataclasses.replace(lay, gpus=lay.tp), dev, mfu, inter_gbs)["total"]
    return {
        "params_total": counts["total"], "params_image_tower": counts["image"],
        "memory_per_gpu_gib": mem["total"] / GIB, "memory_gib": {k: v / GIB for k, v in mem.items()},
        "fits": mem["total"] <= dev.memory_gib * GIB, "gpu": dev.name, "gpu_memory_gib": dev.memory_gib,
        "flops_per_sample": train_flops_per_sample(spec) / 3, "step_time_s": t["total"],
        "step_time_parts_s": {k: v for k, v in t.items() if k != "total"},
        "samples_per_s": lay.global_batch / t["total"], "global_batch": lay.global_batch,
        "scaling_efficiency": single / t["total"], "layout": dataclasses.asdict(lay), "mfu": mfu,
    }


def search(spec: ModelSpec, base: Layout, dev: Device, mfu: float, inter_gbps: float) -> list[dict]:
    """Layouts of the same global batch on the same GPUs that fit, fastest first: TP size, ZeRO
    stage, micro-batch (with gradient accumulation making up the rest) and checkpointing."""
    found = []
    heads = math.gcd(math.gcd(spec.vision.heads, spec.text.heads), math.gcd(spec.vision.width, spec.text.width))
    for tp in (1, 2, 4, 8):
        if tp > min(base.gpus, dev.per_node) or heads % tp or base.gpus % tp:
            continue
        dp = base.gpus // tp
        if base.global_batch % dp:
            continue
        local = base.global_batch // dp
        for micro in sorted({m for m in range(1, local + 1) if local % m == 0}, reverse=True)[:12]:
            for stage in (0, 1, 2, 3):
                for ckpt in (False, True):
                    lay = dataclasses.replace(base, tp=tp, zero_stage=stage, micro_batch=micro,
                                              grad_accum=local // micro, activation_checkpointing=ckpt)
                    p = plan(spec, lay, dev, mfu, inter_gbps)
                    if p["fits"]:
                        found.append(p)
    # Fastest first; within 0.1 %, fewer accumulation steps (accumulation shrinks the contrastive batch
    # each loss sees), then less memory.
    return sorted(found, key=lambda p: (-round(math.log(p["samples_per_s"]) * 1000), p["layout"]["grad_accum"],
                                        p["memory_per_gpu_gib"]))
