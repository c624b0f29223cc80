"""The training loop: data -> DeepSpeed engine -> checkpoints, MLflow, held-out check, export."""

from __future__ import annotations

import math
import os
import pathlib
import signal
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mtx_dist import checkpoint as ckpt
from mtx_dist.async_checkpoint import AsyncCheckpointer
from mtx_dist import faults
from mtx_data_pipelines.loader import LoaderStateError
from mtx_launchers.signals import Preempted, Preemption, parse_signals
from mtx_launchers.slurm import requeue as slurm_requeue
from mtx_dist.config import Config, ConfigError
from mtx_dist.data import DevicePrefetcher, build_loader, record_keys, resolve_shards, skipped_totals
from mtx_dist.engine import Runtime, build_engine, build_model, consolidated_state_dict, global_grad_norm, setup_runtime
from mtx_dist.evaluate import embed_split, retrieval_counts, retrieval_metrics
from mtx_dist.export import write_export
from mtx_dist.flops import peak_tflops, train_flops_per_sample
from mtx_dist.loss import build_loss
from mtx_dist.models import kept_patches
from mtx_dist.errors import TrainingDiverged
from mtx_dist.parallel import destroy_groups
from mtx_dist.step import StepSetup, train_step
from mtx_dist.run_monitor import describe_data, start_system_metrics, start_watchdog, stop_system_metrics
from mtx_dist.resume import check_layout_change, saved_run
from mtx_dist.run_tags import cluster_tags
from mtx_dist.tracking import Tracker
from mtx_dist.watchdog import HangWatchdog

# The end-of-run export: the frozen image blocks for adaptation, both towers for OpenCLIP, and the
# folder as an MLflow pyfunc model (so the version registered from it is servable).
END_OF_RUN_FORMATS = ("metatransformer", "open_clip", "mlflow")


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # per optimizer step trained in this invocation (rank 0's view)
    first_step: int  # step count when this invocation started (> 0 after a resume)
    checkpoint: str | None
    export_dir: str | None
    eval: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    mlflow_url: str | None = None  # the run's page, for an http(s) store
    throughput: dict[str, float] = field(default_factory=dict)  # the last logged window's rates
    preempted: str | None = None  # the signal that stopped this invocation early (after a checkpoint)
    requeued: str | None = None  # what `scontrol requeue` answered (rank 0, under SLURM)


def _say(runtime: Runtime, msg: str) -> None:
    if runtime.is_main:
        tqdm.write(msg)


def preemption_handler(cfg: Config) -> Preemption:
    """The installed handler of ``run.preemption_signals`` (checked by the config): a signal is only
    recorded from now on."""
    return Preemption(parse_signals(cfg.run.preemption_signals)).install()


def train(cfg: Config, preemption: Preemption | None = None) -> TrainResult:
    """Train to ``run.steps``. A preemption signal (``run.preemption_signals``) on any rank stops every rank
    at the next step boundary with a checkpoint; then :class:`Preempted` is raised (exit code 75), after
    rank 0 requeued the SLURM job when ``run.requeue`` is set. ``preemption``: a handler installed earlier
    by the caller (the CLI installs one before its slow imports, so an early signal is not lost)."""
    # Installed before the loader forks its workers, which inherit it: a signal sent to the whole
    # process group (SLURM does) must not kill them.
    preemption = preemption or preemption_handler(cfg)
    try:
        result = _train(cfg, preemption)
    except BaseException:
        preemption.uninstall()
        raise
    if result.preempted:
        # Ignored until the process has left: once one rank exits, torchrun and the deepspeed launcher
        # SIGTERM the others, and `scontrol requeue` SIGTERMs the whole job; each still exits with 75.
        preemption.ignore_further()
        raise Preempted(_preempted_line(result), result, restore=preemption.uninstall)
    preemption.uninstall()
    return result


def _train(cfg: Config, preemption: Preemption) -> TrainResult:
    runtime = setup_runtime(cfg)
    groups = runtime.groups
    os.makedirs(cfg.run.dir, exist_ok=True)
    full = cfg.checkpoint.verify == "full"
    tag = ckpt.resolve(cfg.run.dir, cfg.checkpoint.resume, full) if cfg.checkpoint.resume else None
    reshard = False
    if tag is not None:  # checked before the engine is built: a resharding load configures it
        saved_states, saved_config = saved_run(cfg.run.dir, tag)
        reshard = check_layout_change(cfg, runtime, tag, saved_states, saved_config)
    engine = build_engine(cfg, build_model(cfg, runtime), runtime, load_universal=reshard)
    train_shards, val_shards = resolve_shards(cfg, runtime.env.local_rank)
    # Tensor-parallel peers read the same batches: the data stream is split over data-parallel ranks.
    loader = build_loader(cfg, train_shards, train=True, rank=groups.dp_rank, world_size=groups.dp_size,
                          device=runtime.device.type)

    state = ckpt.TrainState()
    if cfg.checkpoint.resume:
        if tag is None:
            _say(runtime, f"no checkpoint in {ckpt.checkpoint_root(cfg.run.dir)} yet: starting fresh")
        else:
            # every hash was checked by rank 0 (resolve); the other ranks check sizes and pickles
            state = ckpt.load(engine, cfg.run.dir, tag, runtime.env.rank, full and runtime.env.rank == 0,
                              universal=reshard)
            try:
                loader.load_state_dict(state.loader, every_rank=lambda: [s["loader"] for s in saved_states])
            except LoaderStateError as e:  # the data config changed since the checkpoint
                raise ConfigError(f"cannot resume {tag}: {e}") from e
            _say(runtime, f"resumed from {os.path.join(ckpt.checkpoint_root(cfg.run.dir), tag)} at step {state.step}")

    tracker = Tracker(cfg.tracking, active=runtime.is_main, run_dir=cfg.run.dir, background=True)
    # A collective (host names of all ranks): every rank calls it, rank 0 logs the tags.
    tags = cluster_tags(runtime.env, groups.tp_size, groups.dp_size, enabled=cfg.tracking.enabled)
    # None while the store is unreachable (the run is created later; training does not wait for it):
    # then the checkpoint's run id is kept for the next resume.
    state.mlflow_run_id = tracker.start(cfg.run.name or os.path.basename(os.path.abspath(cfg.run.dir)),
                                        cfg.flat(), cfg.to_toml(), run_id=state.mlflow_run_id, step=state.step,
                                        tags=tags, resume=bool(cfg.checkpoint.resume)) or state.mlflow_run_id
    describe_data(tracker, train_shards, val_shards if cfg.run.eval_at_end else None)
    monitor = start_system_metrics(cfg, runtime, tracker, tags)
    watchdog = start_watchdog(cfg, runtime, tracker, state.step)
    try:
        result = _loop(cfg, runtime, engine, loader, state, tracker, preemption, watchdog)
        if cfg.run.eval_at_end and not result.preempted:
            watchdog.beat(state.step, "evaluation")
            result.eval = _evaluate(cfg, runtime, engine, val_shards, tracker, state.step)
        if cfg.run.export_at_end and not result.preempted:
            watchdog.beat(state.step, "export")
            result.export_dir = _export(cfg, runtime, engine, state, tracker, result.eval)
    except KeyboardInterrupt:
        watchdog.stop()  # before the waits below: they are not a hang
        stop_system_metrics(monitor)
        tracker.finish("KILLED")
        raise
    except BaseException:
        watchdog.stop()
        stop_system_metrics(monitor)
        tracker.finish("FAILED")
        raise
    finally:
        watchdog.stop()
        destroy_groups(groups)
    job = os.environ.get("SLURM_JOB_ID")
    if result.preempted and runtime.is_main and cfg.run.requeue and job:
        # First thing once every rank has checkpointed: a rank that has already left may get the step
        # stopped (srun --kill-on-bad-exit). The requeue ends this job too: SIGTERM (recorded, see
        # train), SIGKILL after SLURM's KillWait -- time enough for what follows, though the job's output
        # file may no longer receive it: say what happened first.
        print(f"preempted at step {result.step} by {result.preempted} on some rank; every rank checkpointed; "
              f"requeueing SLURM job {job}", flush=True)
        ok, said = slurm_requeue(job)
        result.requeued = f"requeued SLURM job {job}" if ok else f"requeue of SLURM job {job} failed: {said}"
    stop_system_metrics(monitor)
    tracker.set_note(run_note(cfg, runtime, result))
    tracker.finish("KILLED" if result.preempted else "FINISHED")  # a requeued run continues this MLflow run
    result.mlflow_run_id, result.tracking_uri = tracker.run_id, tracker.uri if tracker.active else None
    result.mlflow_url = tracker.run_url()
    if runtime.is_main:
        _summary(cfg, result)
    return result


def keys_log_path(rank: int) -> str | None:
    """Debugging aid: ``MTX_RECORD_KEYS=path`` records rank 0's sample keys per step; a path with
    ``{rank}`` records every rank's, one file each."""
    path = os.environ.get("MTX_RECORD_KEYS")
    if not path:
        return None
    return path.format(rank=rank) if "{rank}" in path else (path if rank == 0 else None)


def run_note(cfg: Config, runtime: Runtime, result: TrainResult) -> str:
    """The run's description in MLflow: model, layout, how far it got, loss, speed, held-out figures."""
    g, p = runtime.groups, cfg.parallel
    lines = [f"**{cfg.model.preset}** contrastive pretraining on {runtime.env.world_size} "
             f"{runtime.device.type.upper()} rank(s): TP {g.tp_size} x DP {g.dp_size}, ZeRO-{p.zero_stage}, "
             f"{p.precision}, loss {cfg.loss.kind}, "
             f"global batch {cfg.data.batch_size * cfg.optim.grad_accum * g.dp_size}.",
             f"Step {result.step} of {cfg.run.steps}" + (f" (stopped by {result.preempted}; "
                                                         f"{result.requeued or 'not requeued'})" if result.preempted
                                                         else "") + "."]
    if result.losses:
        lines.append(f"Loss {result.losses[0]:.4f} (step {result.first_step + 1}) -> {result.losses[-1]:.4f}.")
    if result.throughput:
        t = result.throughput
        lines.append(f"Throughput {t['samples_per_s']:.0f} samples/s ({t['samples_per_s_per_device']:.0f} per device, "
                     f"{t['tflops_per_device']:.2f} model TFLOP/s per device"
                     + (f", MFU {t['mfu']:.1%}" if "mfu" in t else "") + ").")
    if result.eval:
        e = result.eval
        lines.append(f"Held-out retrieval on {int(e['n'])} pairs ({int(e['distinct_captions'])} distinct captions): "
                     f"image->text R@1 {e['i2t_recall_at_1']:.3f}, text->image R@1 {e['t2i_recall_at_1']:.3f} "
                     f"(chance {e['chance_recall_at_1']:.3f}).")
    if result.export_dir:
        lines.append(f"Export: `{os.path.abspath(result.export_dir)}` (artifacts: `export/`).")
    return "\n\n".join(lines)


def _peak(cfg: Config, runtime: Runtime) -> float | None:
    if cfg.tracking.peak_tflops:
        return cfg.tracking.peak_tflops
    if runtime.device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(runtime.device), cfg.parallel.precision)


def patch_dropout_at(cfg: Config, step: int) -> float:
    """The patch-dropout fraction of optimizer step ``step + 1``: ``model.patch_dropout`` except in FLIP's
    unmasked tail (the last ``model.patch_dropout_final_steps`` steps)."""
    return cfg.model.patch_dropout if step < cfg.run.steps - cfg.model.patch_dropout_final_steps else 0.0


def train_image_size_at(cfg: Config, step: int) -> int:
    """The resolution of optimizer step ``step + 1``: ``model.train_image_size`` (0 = full size) except in
    the full-resolution tail (the last ``model.train_image_size_final_steps`` steps)."""
    return cfg.model.train_image_size if step < cfg.run.steps - cfg.model.train_image_size_final_steps else 0


def step_setup(cfg: Config, runtime: Runtime, engine) -> StepSetup:
    groups = runtime.groups
    loss_fn = build_loss(cfg.loss.kind, groups.dp_group, cfg.loss.gather_with_grad, cfg.loss.local_loss,
                         cfg.loss.tile_size)
    return StepSetup(engine, loss_fn, runtime.device, runtime.dtype, accum=cfg.optim.grad_accum, seed=cfg.run.seed,
                     dp_rank=groups.dp_rank, rank=runtime.env.rank,
                     patches=cfg.model.spec.vision.grid ** 2,
                     patch_size=cfg.model.spec.vision.patch_size, groups=groups)


def _loop(cfg: Config, runtime: Runtime, engine, loader, state: ckpt.TrainState, tracker: Tracker,
          preemption: Preemption | None, watchdog: HangWatchdog) -> TrainResult:
    c = cfg.checkpoint
    saver = AsyncCheckpointer(cfg.run.dir, runtime.env.rank, runtime.device, c.keep, c.verify == "full",
                              c.direct_io) if c.async_ else None
    try:
        return _steps(cfg, runtime, engine, loader, state, tracker, preemption, watchdog, saver)
    finally:
        if saver is not None:
            saver.close()


def _steps(cfg: Config, runtime: Runtime, engine, loader, state: ckpt.TrainState, tracker: Tracker,
           preemption: Preemption | None, watchdog: HangWatchdog, saver: AsyncCheckpointer | None) -> TrainResult:
    groups, world = runtime.groups, runtime.env.world_size
    setup = step_setup(cfg, runtime, engine)
    # read once: every checkpoint holds the model config the run was built from
    model_config = pathlib.Path(cfg.model.config_file).read_text() if cfg.model.config_file else None
    accum = cfg.optim.grad_accum
    samples_per_step = cfg.data.batch_size * accum * groups.dp_size
    spec, peak = cfg.model.spec, _peak(cfg, runtime)
    first_step, losses, pending = state.step, [], []
    last_ckpt = None
    # holds the loader state of the batches handed out
    feed = DevicePrefetcher(loader, runtime.device, cfg.data.prefetch, rank=runtime.env.rank, dtype=setup.dtype)
    batches = iter(feed)
    keys_log = keys_log_path(runtime.env.rank)
    engine.train()
    bar = tqdm(total=cfg.run.steps, initial=state.step, disable=not runtime.is_main, unit="step",
               dynamic_ncols=True, mininterval=1.0, desc="train")
    window_start, window_steps, data_wait, window_flops = time.perf_counter(), 0, 0.0, 0.0
    throughput, in_a_row, check_every, stop = {}, 0, cfg.run.preemption_check_every, None
    while state.step < cfg.run.steps:
        log_now = (state.step + 1) % cfg.run.log_every == 0 or state.step + 1 == cfg.run.steps
        # A preemption signal on some rank travels with this step's one collective: every rank learns it
        # at the same step, checkpoints and leaves.
        ask = preemption is not None and state.step + 1 < cfg.run.steps and (state.step + 1) % check_every == 0
        drop, size = patch_dropout_at(cfg, state.step), train_image_size_at(cfg, state.step)
        on_batch = (lambda b, s=state.step: record_keys(keys_log, s, b)) if keys_log else None
        result = train_step(setup, batches, state.step, drop, int(preemption.received or 0) if ask else 0,
                            want_grad_norm=log_now, on_batch=on_batch, image_size=size,
                            checkpoint=saver.status() if saver else 0)
        if saver is not None:
            saver.agreed(result.checkpoint)  # an asynchronous save moves on, or its failure raises on every rank
            last_ckpt = saver.last or last_ckpt
        pending.append(result.losses)
        data_wait += result.data_wait_s
        grid = (size or spec.vision.image_size) // spec.vision.patch_size
        kept = kept_patches(grid ** 2, drop)
        window_flops += train_flops_per_sample(spec, 1 + kept, result.last_batch["text"].shape[1], grid=grid)
        state.step += 1
        state.samples += samples_per_step
        faults.hit("step", state.step, runtime.env.rank)
        faults.send_signal(state.step, runtime.env.rank)
        faults.hang("step", state.step, runtime.env.rank)
        watchdog.beat(state.step)
        if result.skipped:  # non-finite loss or gradients on some rank: nobody updated
            state.skipped_steps += 1
            in_a_row += 1
            _say(runtime, f"step {state.step}: non-finite loss or gradient norm on some rank; update skipped on all "
                          f"ranks ({in_a_row} in a row, limit {cfg.optim.max_skipped_steps})")
            if in_a_row >= cfg.optim.max_skipped_steps:
                raise TrainingDiverged(
                    f"{in_a_row} consecutive steps had a non-finite loss or gradient norm (optim.max_skipped_steps = "
                    f"{cfg.optim.max_skipped_steps}); stopping at step {state.step}. Parameters are those of step "
                    f"{state.step - in_a_row}; the last checkpoint is kept: {last_ckpt or 'none written yet'}")
        else:
            in_a_row = 0
        window_steps += 1
        bar.update(1)
        if log_now:
            # With a local loss each data-parallel rank holds its share: the global loss is the mean.
            step_losses = torch.stack(pending).float().mean(dim=1)
            if groups.dp_size > 1:
                torch.distributed.all_reduce(step_losses, group=groups.dp_group)
                step_losses /= groups.dp_size
            step_losses = step_losses.tolist()
            losses.extend(step_losses)
            pending.clear()
            elapsed = time.perf_counter() - window_start
            sps = window_steps * samples_per_step / elapsed
            finite = [x for x in step_losses if math.isfinite(x)]
            metrics = {
                "train/loss": sum(finite) / len(finite) if finite else float("nan"),
                "train/skipped_steps": state.skipped_steps,
                "train/lr": engine.get_lr()[0],
                "train/logit_scale": float(result.scale),
                "train/samples": state.samples,
                "perf/samples_per_s": sps,
                "perf/samples_per_s_per_device": sps / world,
                "perf/tflops_per_device": window_flops / window_steps * sps / world / 1e12,
                "perf/data_wait_frac": data_wait / elapsed,
            }
            if result.bias is not None:
                metrics["train/logit_bias"] = float(result.bias)
            if peak:
                metrics["perf/mfu"] = metrics["perf/tflops_per_device"] / peak
            norm = global_grad_norm(engine) if engine.zero_optimization_stage() else result.grad_norm
            if norm is not None:
                metrics["train/grad_norm"] = norm
            # Summed over workers (in the loader) and data-parallel ranks (a collective: every rank logs).
            # Only counters that are not zero: a clean run shows no data/ chart at all.
            skips = skipped_totals(feed.skipped, groups.dp_group, groups.dp_size, runtime.device)
            metrics.update({f"data/skipped_{k}": v for k, v in skips.items() if v})
            if any(skips.values()):
                metrics["data/skipped_total"] = sum(skips.values())
            tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=state.step)
            throughput = {k: metrics[f"perf/{k}"] for k in ("samples_per_s", "samples_per_s_per_device",
                                                            "tflops_per_device", "mfu") if f"perf/{k}" in metrics}
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", sps=f"{sps:.0f}", lr=f"{metrics['train/lr']:.2e}",
                            refresh=False)
            window_start, window_steps, data_wait, window_flops = time.perf_counter(), 0, 0.0, 0.0
        stop = signal.Signals(result.signal) if result.signal else None
        if stop or state.step % cfg.checkpoint.every == 0 or state.step == cfg.run.steps:
            state.loader = feed.state_dict()
            state.mlflow_run_id = tracker.run_id or state.mlflow_run_id  # created late if the store was slow
            watchdog.beat(state.step, "checkpoint")
            if saver is None:
                last_ckpt = ckpt.save(engine, cfg.run.dir, state, runtime.env.rank, keep=cfg.checkpoint.keep,
                                      config_toml=cfg.to_toml(), full_hashes=cfg.checkpoint.verify == "full",
                                      model_config=model_config, direct=cfg.checkpoint.direct_io)
            else:
                saver.save(engine, state, cfg.to_toml(), model_config)
                if stop or state.step == cfg.run.steps:  # leaving: wait for the save in flight
                    last_ckpt = saver.drain()
            watchdog.beat(state.step)
        if stop:
            break
    bar.close()
    if last_ckpt is None:
        tag = ckpt.resolve(cfg.run.dir, "latest")
        last_ckpt = os.path.join(ckpt.checkpoint_root(cfg.run.dir), tag) if tag else None
    return TrainResult(step=state.step, losses=losses, first_step=first_step, checkpoint=last_ckpt, export_dir=None,
                       throughput=throughput, preempted=stop.name if stop else None)


def _evaluate(cfg: Config, runtime: Runtime, engine, shards: str, tracker: Tracker, step: int) -> dict[str, float]:
    groups = runtime.groups
    loader = build_loader(cfg, shards, train=False, rank=groups.dp_rank, world_size=groups.dp_size,
                          device=runtime.device.type)
    engine.eval()
    img, txt, captions = embed_split(engine, loader, runtime.device, runtime.dtype, groups.dp_group)
    engine.train()
    metrics = retrieval_metrics(img, txt, groups=captions)
    metrics["n"] = float(img.shape[0])
    metrics.update(retrieval_counts(captions))
    tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=step)
    return metrics


def _export(cfg: Config, runtime: Runtime, engine, state: ckpt.TrainState, tracker: Tracker,
            held_out: dict | None = None) -> str:
    full = consolidated_state_dict(engine, runtime.groups)  # a collective: every rank takes part
    out_dir = os.path.join(cfg.run.dir, "export")
    if runtime.is_main:
        source = {"run_dir": os.path.abspath(cfg.run.dir), "step": state.step, "samples": state.samples,
                  "mlflow_run_id": tracker.run_id or state.mlflow_run_id,
                  "tracking_uri": tracker.uri if tracker.active else None,
                  "data": cfg.data.train or "demo shards", "held_out": held_out or None}
        write_export(full, cfg.model.spec, cfg.model.geometry_name, out_dir, source, END_OF_RUN_FORMATS)
        tracker.log_artifacts(out_dir, "export")
        tracker.register_model("export")  # a version of tracking.register_as pointing at these artifacts
    return out_dir


def _preempted_line(result: TrainResult) -> str:
    where = os.path.abspath(result.checkpoint) if result.checkpoint else "none"
    return f"preempted at step {result.step} by {result.preempted}; checkpoint {where}; " + (
        result.requeued or "not requeued (resume with --resume latest)")


def _summary(cfg: Config, result: TrainResult) -> None:
    lines = [f"trained to step {result.step} of {cfg.run.steps}"]
    if result.preempted:
        lines[0] += (f": preempted at step {result.step} by {result.preempted} on some rank; every rank "
                     f"checkpointed; " + (result.requeued or "not requeued (resume with --resume latest)"))
    if result.losses:
        lines.append(f"loss: {result.losses[0]:.4f} (step {result.first_step + 1}) -> {result.losses[-1]:.4f}")
    if result.throughput:
        t = result.throughput
        mfu = f", MFU {t['mfu']:.1%}" if "mfu" in t else ""
        lines.append(f"throughput: {t['samples_per_s']:.0f} samples/s ({t['samples_per_s_per_device']:.0f} per device, "
                     f"{t['tflops_per_device']:.2f} model TFLOP/s per device{mfu})")
    if result.eval:
        e = result.eval
        lines.append(f"held-out retrieval on {int(e['n'])} pairs ({int(e['distinct_captions'])} distinct captions): "
                     f"image->text recall@1 {e['i2t_recall_at_1']:.3f}, text->image recall@1 "
                     f"{e['t2i_recall_at_1']:.3f} (chance {e['chance_recall_at_1']:.3f})")
    if result.checkpoint:
        lines.append(f"checkpoint: {os.path.abspath(result.checkpoint)}")
    if result.export_dir:
        lines.append(f"export:     {os.path.abspath(result.export_dir)}")
    if result.mlflow_run_id:
        uri = result.tracking_uri or ""
        if uri.startswith("sqlite:///"):
            uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
        view = (f"open {result.mlflow_url or uri}" if uri.startswith(("http://", "https://")) else
                f"view with `mlflow ui --backend-store-uri {uri}`, then its Model training view")
        lines.append(f"mlflow:     {uri} (run {result.mlflow_run_id}; {view})")
    tqdm.write("\n".join(lines))
