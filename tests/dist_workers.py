"""Functions run on every rank by tests.dist.run_ranks (module level, so spawned processes import them),
and the single-process references they are compared with."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from mtx_dist.config import load_config
from mtx_dist.loss import SINGLE_PROCESS_LOSSES, build_loss, clip_loss, logit_init
from mtx_dist.models import ContrastiveModel, get_preset
from mtx_dist.models.presets import ModelSpec
from mtx_dist.optim import build_optimizer, build_scheduler
from mtx_dist.synthetic import EOT, synthetic_pairs



def micro_cfg(*overrides: str):
    return load_config(None, ["model.preset=micro", "run.steps=10", "optim.warmup_steps=2", "optim.lr=2e-3",
                              "optim.grad_clip=0.5", "data.batch_size=4", *overrides])


global_batch = synthetic_pairs  # the tests' name


def short_text(spec: ModelSpec, n: int, longest: int = 6, seed: int = 5) -> torch.Tensor:
    """(n, context length) ids of captions of at most ``longest`` tokens (EOT included), zero padded:
    a batch that text trimming pads to 8 tokens only."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, longest + 1, (n,), generator=g)
    text = torch.randint(1, 49000, (n, spec.text.context_length), generator=g)
    text = torch.where(torch.arange(text.shape[1]) < lengths[:, None], text, torch.zeros_like(text))
    text[torch.arange(n), lengths - 1] = EOT
    return text


def local_slice(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return t.chunk(size, dim=0)[rank]


def _loss_of(model, kind: str, image, text, loss_fn=None):
    """``loss_fn`` on the model's outputs; by default the single-process loss (no process group involved)."""
    img, txt, scale, bias = model(image, text)
    return (loss_fn or SINGLE_PROCESS_LOSSES[kind])(img, txt, scale, bias)


# -- tensor parallelism: fwd/bwd of a TP model vs the same weights unsharded -----------------------

def layout_error() -> str:
    """tensor_parallel=4 on 2 ranks: the error a user sees."""
    from mtx_dist.config import ConfigError
    from mtx_dist.engine import setup_runtime
    try:
        setup_runtime(load_config(None, ["parallel.tensor_parallel=4"]))
    except ConfigError as e:
        return str(e)
    return "no error"


def tp_forward_backward(activation_checkpointing: bool) -> dict[str, float]:
    from mtx_dist.parallel import gather_tensor_parallel, init_groups, parallelize
    groups = init_groups(dist.get_world_size(), timeout_s=120)
    torch.manual_seed(0)
    full = ContrastiveModel(get_preset("micro"))
    tp = parallelize(copy.deepcopy(full), groups, activation_checkpointing)
    image, text = global_batch(full.spec, 6, step=0)
    out_full, out_tp = full(image, text), tp(image, text)
    loss_full = clip_loss(*out_full[:3])
    loss_tp = clip_loss(*out_tp[:3])
    loss_full.backward()
    loss_tp.backward()
    grads_tp = gather_tensor_parallel({n: p.grad for n, p in tp.named_parameters()}, groups)
    grads_full = dict(full.named_parameters())
    sharded = sum(1 for p in tp.parameters() if getattr(p, "tensor_model_parallel", False))
    with torch.no_grad():  # text trimming under TP: a batch padded to 8 tokens == the same padded to 16
        short = short_text(full.spec, 6)
        trimmed = float((tp.encode_text(short) - tp.encode_text(short[:, :8])).abs().max())
    return {
        "trimmed_text": trimmed,
        "features": max(float((a - b).abs().max()) for a, b in zip(out_full[:2], out_tp[:2])),
        "loss": abs(float(loss_full - loss_tp)) / max(1.0, abs(float(loss_full))),  # relative (the loss is ~2.6)
        # relative to each gradient's largest entry (their scale depends on the init and the batch)
        "grads": max(float((grads_full[n].grad - g).abs().max() / grads_full[n].grad.abs().max().clamp_min(1e-12))
                     for n, g in grads_tp.items()),
        "grad_names_match": sorted(grads_tp) == sorted(grads_full),
        "sharded_params": sharded,
        "local_numel": sum(p.numel() for p in tp.parameters()),
        "full_numel": sum(p.numel() for p in full.parameters()),
    }


# -- data-parallel losses vs the single-process loss on the concatenated batch ----------------------

def dp_loss_grads(kind: str, gather_with_grad: bool, local_loss: bool, per_rank: int = 3,
                  tile_size: int = 0) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    scale_init, bias_init = logit_init(kind)
    torch.manual_seed(0)
    model = ContrastiveModel(get_preset("micro"), logit_scale_init=scale_init, logit_bias_init=bias_init)
    reference = copy.deepcopy(model)
    image, text = global_batch(model.spec, per_rank * world, step=0)
    loss_fn = build_loss(kind, None, gather_with_grad, local_loss, tile_size)
    loss = _loss_of(model, kind, local_slice(image, rank, world), local_slice(text, rank, world), loss_fn)
    loss.backward()
    for p in model.parameters():  # what DeepSpeed/DDP do: average the gradients over data-parallel ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    ref_loss = _loss_of(reference, kind, image, text)
    ref_loss.backward()
    ref = dict(reference.named_parameters())
    return {
        "loss": float(mean_loss), "ref_loss": float(ref_loss.detach()),
        "grad_err": max(float((p.grad - ref[n].grad).abs().max()) for n, p in model.named_parameters()),
        "grad_scale": max(float(p.grad.abs().max()) for p in reference.parameters()),
    }


# -- the DeepSpeed engine on synthetic batches ------------------------------------------------------

def engine_run(overrides: list[str], steps: int, save_dir: str | None = None) -> dict:
    """Train ``steps`` steps of the micro model on synthetic global batches; return the (data-parallel
    mean) losses, and with ``save_dir`` a checkpoint there plus the live consolidated weights."""
    from mtx_dist.engine import build_engine, build_model, consolidated_state_dict, global_grad_norm, setup_runtime
    from mtx_dist.parallel import destroy_groups, grad_norm

    cfg = micro_cfg(*overrides)
    runtime = setup_runtime(cfg)
    groups = runtime.groups
    engine = build_engine(cfg, build_model(cfg, runtime), runtime)
    loss_fn = build_loss(cfg.loss.kind, groups.dp_group, cfg.loss.gather_with_grad, cfg.loss.local_loss)
    spec = get_preset(cfg.model.preset)
    losses, norms = [], []
    for step in range(steps):
        image, text = global_batch(spec, cfg.data.batch_size * groups.dp_size, step)
        image, text = local_slice(image, groups.dp_rank, groups.dp_size), local_slice(text, groups.dp_rank, groups.dp_size)
        img, txt, scale, bias = engine(image.to(runtime.dtype), text)
        loss = loss_fn(img, txt, scale, bias)
        engine.backward(loss)
        if cfg.parallel.zero_stage == 0:
            norms.append(grad_norm(engine.module, groups))
        engine.step()
        if cfg.parallel.zero_stage:
            norms.append(global_grad_norm(engine))
        mean = loss.detach().float().clone()
        dist.all_reduce(mean, group=groups.dp_group)
        losses.append(float(mean / groups.dp_size))
    out: dict = {"losses": losses, "grad_norms": norms, "dp_size": groups.dp_size, "tp_size": groups.tp_size}
    if save_dir:
        engine.save_checkpoint(save_dir, tag="ckpt", save_latest=False)
        live = consolidated_state_dict(engine, groups)
        out["live"] = live if dist.get_rank() == 0 else None
        out["files"] = sorted(os.listdir(os.path.join(save_dir, "ckpt"))) if dist.get_rank() == 0 else None
    destroy_groups(groups)
    return out


def engine_runs(variants: list[list[str]], steps: int) -> list[dict]:
    """:func:`engine_run` for each override list in turn, in the same processes (saves start-ups)."""
    return [engine_run(v, steps) for v in variants]


def reference_run(overrides: list[str], steps: int, dp_size: int) -> tuple[list[float], list[float]]:
    """The same training in one process, plain torch, on the concatenated global batch:
    (losses, gradient norms before clipping)."""
    cfg = micro_cfg(*overrides)
    torch.manual_seed(cfg.run.seed)
    scale_init, bias_init = logit_init(cfg.loss.kind)
    model = ContrastiveModel(get_preset(cfg.model.preset), cfg.model.attention, scale_init, bias_init)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.run.steps)
    losses, norms = [], []
    for step in range(steps):
        image, text = global_batch(model.spec, cfg.data.batch_size * dp_size, step)
        loss = _loss_of(model, cfg.loss.kind, image, text)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, norms


# -- the trainer (real shards, checkpoints) ---------------------------------------------------------

def train_resume(base: list[str], whole_dir: str, split_dir: str, steps: int, stop: int) -> dict:
    """An uninterrupted run of ``steps``, and one stopped at ``stop`` then resumed to ``steps``."""
    from mtx_dist.trainer import train

    whole = train(load_config(None, [*base, f"run.dir={whole_dir}", f"run.steps={steps}"]))
    first = train(load_config(None, [*base, f"run.dir={split_dir}", f"run.steps={stop}", "optim.decay_steps="
                                     f"{steps}"]))
    second = train(load_config(None, [*base, f"run.dir={split_dir}", f"run.steps={steps}",
                                      "checkpoint.resume=latest"]))
    return {"whole": whole.losses, "first": first.losses, "second": second.losses,
            "resumed_at": second.first_step}


def train_recording_keys(overrides: list[str], keys_path: str) -> dict:
    """The trainer with every rank's sample keys recorded (``keys_path`` contains ``{rank}``)."""
    from mtx_dist.trainer import train

    os.environ["MTX_RECORD_KEYS"] = keys_path
    try:
        result = train(load_config(None, overrides))
    finally:
        os.environ.pop("MTX_RECORD_KEYS", None)
    return {"losses": result.losses, "step": result.step, "first_step": result.first_step}


def reshard_round_trip(overrides: list[str], run_dir: str, save: bool, steps_after: int = 1) -> dict:
    """Save (``save``) or resume -- resharded through DeepSpeed's universal checkpoint when the
    data-parallel size differs -- a micro engine trained 2 steps on the same global batches; then
    ``steps_after`` more steps. Returns rank 0's consolidated weights before and after them."""
    from mtx_dist import checkpoint as ckpt
    from mtx_dist.engine import build_engine, build_model, consolidated_state_dict, setup_runtime
    from mtx_dist.parallel import destroy_groups

    cfg = micro_cfg(*overrides, "data.batch_size=8", "run.steps=10")
    runtime = setup_runtime(cfg)
    groups = runtime.groups
    engine = build_engine(cfg, build_model(cfg, runtime), runtime, load_universal=not save)
    loss_fn = build_loss(cfg.loss.kind, groups.dp_group)
    spec = get_preset(cfg.model.preset)

    def step(n):
        image, text = global_batch(spec, 8, n)
        image, text = local_slice(image, groups.dp_rank, groups.dp_size), local_slice(text, groups.dp_rank, groups.dp_size)
        engine.backward(loss_fn(*engine(image.to(runtime.dtype), text)))
        engine.step()

    if save:
        for n in range(2):
            step(n)
        state = ckpt.TrainState(step=2, loader={"world_size": groups.dp_size})
        ckpt.save(engine, run_dir, state, runtime.env.rank, config_toml=cfg.to_toml())
    else:
        ckpt.load(engine, run_dir, ckpt.tag_for(2), runtime.env.rank, universal=True)
    # numpy: pickled by value (a tensor would travel as a shared-memory handle of a process that ends)
    before = {k: v.numpy().copy() for k, v in consolidated_state_dict(engine, groups).items()}
    for n in range(2, 2 + steps_after):
        step(n)
    after = {k: v.numpy().copy() for k, v in consolidated_state_dict(engine, groups).items()}
    destroy_groups(groups)
    return {"before": before, "after": after} if dist.get_rank() == 0 else {}


def train_with_faults(overrides: list[str], faults_spec: str) -> dict:
    """The trainer with ``MTX_FAULTS`` switched on in this rank; a divergence stop is returned, not raised."""
    from mtx_dist.errors import TrainingDiverged
    from mtx_dist.trainer import train

    os.environ["MTX_FAULTS"] = faults_spec
    try:
        result = train(load_config(None, overrides))
    except TrainingDiverged as e:
        return {"stopped": str(e)}
    finally:
        os.environ.pop("MTX_FAULTS", None)
    return {"losses": result.losses, "step": result.step}


# -- collectives of one production training step ----------------------------------------------------

def count_collectives(overrides: list[str], steps: int) -> dict:
    """Collectives per :func:`mtx_dist.step.train_step` of the micro model on 2 ranks, by who issues them:
    DeepSpeed (gradient reduction), the loss (feature all-gather and its backward) or anything else.
    Rank 1 shares preemption signal 10 with the last step, and checkpoint status i at step i (rank 0: 0);
    both must learn them from that step's result."""
    import traceback

    from mtx_dist.engine import build_engine, build_model, setup_runtime
    from mtx_dist.parallel import destroy_groups
    from mtx_dist.step import train_step
    from mtx_dist.trainer import step_setup

    cfg = micro_cfg(*overrides)
    runtime = setup_runtime(cfg)
    groups = runtime.groups
    engine = build_engine(cfg, build_model(cfg, runtime), runtime)
    setup = step_setup(cfg, runtime, engine)
    spec = get_preset(cfg.model.preset)
    calls: list[tuple[str, str, int]] = []  # (issuer, collective, elements)
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
             "broadcast", "barrier", "reduce", "all_to_all_single", "all_gather_object", "broadcast_object_list")
    originals = {n: getattr(dist, n) for n in names}

    def issuer() -> str:  # the file that called torch.distributed
        caller = traceback.extract_stack()[-3].filename.replace(os.sep, "/")
        if caller.endswith("/mtx_dist/parallel/collectives.py"):
            return "loss"
        if "/deepspeed/" in caller:
            return "deepspeed"
        return "/".join(caller.rsplit("/", 2)[-2:])

    def counted(name):
        def call(*args, **kwargs):
            t = args[0] if args else next(iter(kwargs.values()))
            calls.append((issuer(), name, t.numel() if isinstance(t, torch.Tensor) else -1))
            return originals[name](*args, **kwargs)
        return call

    def batches():
        for step in range(steps):
            image, text = global_batch(spec, cfg.data.batch_size * groups.dp_size, step)
            yield {"image": local_slice(image, groups.dp_rank, groups.dp_size),
                   "text": local_slice(text, groups.dp_rank, groups.dp_size)}

    feed, out = batches(), {"ours": [], "deepspeed": [], "deepspeed_small": [], "loss": [], "signal": [],
                            "checkpoint": []}
    try:
        for n in names:
            setattr(dist, n, counted(n))
        for step in range(steps):
            calls.clear()
            shared = 10 if step == steps - 1 and dist.get_rank() == 1 else 0
            result = train_step(setup, feed, step, signal=shared, checkpoint=step * dist.get_rank())
            for who in ("deepspeed", "loss"):
                out[who].append(sorted({n for i, n, _ in calls if i == who}))
            # DeepSpeed's scalar collectives (a gradient norm's all-reduce), beside its gradient traffic
            out["deepspeed_small"].append(sum(i == "deepspeed" and 0 <= k <= 8 for i, _, k in calls))
            out["ours"].append([(i, n, k) for i, n, k in calls if i not in ("deepspeed", "loss")])
            out["signal"].append(result.signal)
            out["checkpoint"].append(result.checkpoint)
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    destroy_groups(groups)
    return out


# -- bytes each rank sends per training step, by collective ---------------------------------------

def comm_bytes_per_step(overrides: list[str]) -> dict:
    """Bytes this rank sends in the second :func:`mtx_dist.step.train_step` of the micro model, by who
    issues the collective (the loss, DeepSpeed's data-parallel traffic, megatron-core's tensor-parallel
    all-reduces; anything else is ``other``), counted as ring algorithms send them: an all-reduce
    2(n-1)/n of its tensor, an all-gather n-1 times its input, a reduce-scatter (n-1)/n of its input.
    The wrappers go in before DeepSpeed starts: it keeps references to some of these functions."""
    import inspect
    import traceback

    from torch.distributed import distributed_c10d  # the signatures, even under another wrapper

    sent = {"loss_gather": 0.0, "data_parallel": 0.0, "tensor_parallel": 0.0, "other": 0.0}
    counting = [False]
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
             "_reduce_scatter_base", "_all_gather_base", "all_reduce_coalesced")
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def issuer() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            f = frame.filename.replace(os.sep, "/")
            if f.endswith("/mtx_dist/parallel/collectives.py"):
                return "loss_gather"
            if "/megatron/" in f:
                return "tensor_parallel"
            if "/deepspeed/" in f:
                return "data_parallel"
        return "other"

    def nbytes(t) -> int:
        return sum(x.numel() * x.element_size() for x in t) if isinstance(t, (list, tuple)) else t.numel() * t.element_size()

    def counted(name):
        params = list(inspect.signature(getattr(distributed_c10d, name)).parameters)

        def call(*args, **kwargs):
            bound = {**dict(zip(params, args)), **kwargs}
            n = dist.get_world_size(bound.get("group")) if counting[0] else 1
            if n > 1:
                if name in ("all_reduce", "all_reduce_coalesced"):
                    b = 2 * (n - 1) / n * nbytes(bound[params[0]])
                elif name == "all_gather":
                    b = (n - 1) * nbytes(bound["tensor"])
                elif name in ("all_gather_into_tensor", "_all_gather_base"):
                    b = (n - 1) * nbytes(bound[params[1]])
                else:  # reduce-scatter: its input
                    b = (n - 1) / n * nbytes(bound[params[1]])
                sent[issuer()] += b
            return originals[name](*args, **kwargs)
        return call

    for n in originals:
        setattr(dist, n, counted(n))
    try:
        from mtx_dist.engine import build_engine, build_model, setup_runtime
        from mtx_dist.parallel import destroy_groups
        from mtx_dist.step import train_step
        from mtx_dist.trainer import step_setup

        cfg = micro_cfg(*overrides)
        runtime = setup_runtime(cfg)
        groups = runtime.groups
        engine = build_engine(cfg, build_model(cfg, runtime), runtime)
        setup = step_setup(cfg, runtime, engine)
        spec = cfg.model.spec

        def batches():
            for step in range(2):
                image, text = global_batch(spec, cfg.data.batch_size * groups.dp_size, step)
                yield {"image": local_slice(image, groups.dp_rank, groups.dp_size),
                       "text": local_slice(text, groups.dp_rank, groups.dp_size)}

        feed = batches()
        train_step(setup, feed, 0)
        counting[0] = True
        train_step(setup, feed, 1)
        counting[0] = False
        destroy_groups(groups)
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    return sent


# -- deferred initialisation: a rank's weights without the whole model in its memory ---------------

def tp_build_memory(preset: str, deferred: bool) -> dict:
    """Peak host memory (VmHWM growth) of building ``preset`` at TP = world size, deferred (the
    engine's build_model) or eager (the whole model, then each rank's slices); then whether the
    rank's weights equal the eager whole model's slices, bit for bit."""
    import gc

    from tests.helpers import peak_rss_bytes

    from mtx_dist.engine import build_model, setup_runtime
    from mtx_dist.parallel import destroy_groups, parallelize, shard_tensor

    cfg = load_config(None, [f"model.preset={preset}", f"parallel.tensor_parallel={dist.get_world_size()}",
                             "run.seed=7"])
    runtime = setup_runtime(cfg)
    groups = runtime.groups
    import megatron.core.tensor_parallel  # noqa: F401  (imported before the baseline, as both builds need it)

    gc.collect()
    base = peak_rss_bytes()
    if deferred:
        model = build_model(cfg, runtime)
    else:
        torch.manual_seed(cfg.run.seed)
        model = parallelize(ContrastiveModel(cfg.model.spec), groups)
    peak = peak_rss_bytes() - base
    kept = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.manual_seed(cfg.run.seed)
    full = ContrastiveModel(cfg.model.spec).state_dict()
    mine = model.state_dict()
    equal = sorted(mine) == sorted(full) and all(
        torch.equal(mine[n], shard_tensor(n, full[n], groups.tp_rank, groups.tp_size)) for n in full)
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    destroy_groups(groups)
    # a slice is its own contiguous storage, not a view keeping the whole parameter alive
    own = all(p.is_contiguous() and p.untyped_storage().nbytes() == p.numel() * p.element_size()
              for p in model.parameters())
    return {"peak": peak, "kept": kept, "full": full_bytes, "equal": equal, "own_storage": own,
            "sharded": sum(1 for p in model.parameters() if getattr(p, "tensor_model_parallel", False))}


def zero3_build_memory(preset: str, partition: bool, precision: str = "fp32", check: bool = False) -> dict:
    """Peak host memory (VmHWM growth) of building ``preset`` for ZeRO-3 over the world (TP = 1): the
    engine's build_model, which partitions each parameter as it is placed, or (``partition`` False) the
    same deferred build without that, which holds the whole model until DeepSpeed partitions it. Then
    (``check``) whether the gathered weights of DeepSpeed's engine built around the partitioned model
    equal the eager seeded build's (cast to bf16 under bf16), bit for bit, and their dtypes."""
    import gc

    from tests.helpers import peak_rss_bytes

    from mtx_dist.engine import build_engine, build_model, setup_runtime
    from mtx_dist.models.deferred import materialize, place_into, record
    from mtx_dist.parallel import destroy_groups

    cfg = load_config(None, [f"model.preset={preset}", "parallel.zero_stage=3", f"parallel.precision={precision}",
                             "run.seed=7", "run.device=cpu"])
    runtime = setup_runtime(cfg)
    import deepspeed  # noqa: F401  (imported before the baseline, as both builds need it)

    gc.collect()
    base = peak_rss_bytes()
    if partition:
        model = build_model(cfg, runtime)
    else:
        torch.manual_seed(cfg.run.seed)
        model, calls = record(lambda: ContrastiveModel(cfg.model.spec))
        materialize(calls, {n: (p.shape, p.dtype) for n, p in model.named_parameters()}, place_into(model, "cpu"))
    peak = peak_rss_bytes() - base
    kept = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor")
               else p.numel() * p.element_size() for p in model.parameters())
    with torch.device("meta"):
        full_bytes = sum(p.numel() * p.element_size() for p in ContrastiveModel(cfg.model.spec).parameters())
    equal, dtypes = None, None
    if check:
        import deepspeed
        torch.manual_seed(cfg.run.seed)
        full = ContrastiveModel(cfg.model.spec).state_dict()
        model = build_engine(cfg, model, runtime).module
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            mine = {n: p.detach().clone() for n, p in model.named_parameters()}
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        equal = sorted(mine) == sorted(full) and all(torch.equal(mine[n], full[n].to(want)) for n in full)
    destroy_groups(runtime.groups)
    return {"peak": peak, "kept": kept, "full": full_bytes, "equal": equal, "dtypes": dtypes}


def tp_zero3_build(preset: str, check: bool = False) -> dict:
    """Build ``preset`` at TP = 2 under ZeRO-3 over the world (data-parallel size world / 2): the most bytes of
    parameter storage the rank holds at any point of build_model (on entry to the replay and after each
    parameter is placed: partitions of those done, nothing of those to come), and at the end; then
    (``check``) whether DeepSpeed's engine around it gathers to this rank's slices of the eager build."""
    import mtx_dist.models.deferred as deferred
    from mtx_dist.engine import build_engine, build_model, setup_runtime
    from mtx_dist.parallel import destroy_groups, shard_tensor

    cfg = load_config(None, [f"model.preset={preset}", "parallel.zero_stage=3", "parallel.tensor_parallel=2",
                             "run.seed=7", "run.device=cpu"])
    runtime = setup_runtime(cfg)
    built, most = [], [0]

    def held() -> int:
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor")
                   else 0 if p.is_meta else p.numel() * p.element_size() for p in built[0].parameters())

    def record(build):
        model, calls = real_record(build)
        built.append(model)
        return model, calls

    def materialize(calls, shapes, place):
        def measured(name, full):
            place(name, full)
            most[0] = max(most[0], held())
        most[0] = held()
        real_materialize(calls, shapes, measured)

    real_record, real_materialize = deferred.record, deferred.materialize
    deferred.record, deferred.materialize = record, materialize
    try:
        model = build_model(cfg, runtime)
    finally:
        deferred.record, deferred.materialize = real_record, real_materialize
    kept = held()
    equal = None
    if check:
        import deepspeed
        groups = runtime.groups
        torch.manual_seed(cfg.run.seed)
        full = ContrastiveModel(cfg.model.spec).state_dict()
        model = build_engine(cfg, model, runtime).module
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            mine = {n: p.detach().clone() for n, p in model.named_parameters()}
        equal = sorted(mine) == sorted(full) and all(
            torch.equal(mine[n], shard_tensor(n, full[n], groups.tp_rank, groups.tp_size)) for n in full)
    with torch.device("meta"):
        full_bytes = sum(p.numel() * p.element_size() for p in ContrastiveModel(cfg.model.spec).parameters())
    destroy_groups(runtime.groups)
    return {"most": most[0], "kept": kept, "full": full_bytes, "equal": equal}
