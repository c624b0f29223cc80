"""The training loop: data -> DeepSpeed engine -> checkpoints, MLflow, held-out check, export."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mtx_dist import checkpoint as ckpt
from mtx_dist import faults
from data_pipelines.loader import LoaderStateError
from mtx_dist.config import Config, ConfigError
from mtx_dist.data import build_loader, resolve_shards
from mtx_dist.engine import (Runtime, build_engine, build_model, consolidated_state_dict, global_grad_norm,
                             setup_runtime)
from mtx_dist.evaluate import embed_split, retrieval_metrics
from mtx_dist.export import export_encoder
from mtx_dist.flops import peak_tflops, train_flops_per_sample
from mtx_dist.loss import build_loss
from mtx_dist.models import get_preset
from mtx_dist.optim import TrainingDiverged
from mtx_dist.parallel import destroy_groups, grad_norm
from mtx_dist.tracking import Tracker



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
    throughput: dict[str, float] = field(default_factory=dict)  # the last logged window's rates


def _say(runtime: Runtime, msg: str) -> None:
    if runtime.is_main:
        tqdm.write(msg)


def train(cfg: Config) -> TrainResult:
    runtime = setup_runtime(cfg)
    groups = runtime.groups
    os.makedirs(cfg.run.dir, exist_ok=True)
    engine = build_engine(cfg, build_model(cfg, runtime), runtime)
    train_shards, val_shards = resolve_shards(cfg, runtime.env.local_rank)
    # Tensor-parallel peers read the same batches: the data stream is split over data-parallel ranks.
    loader = build_loader(cfg, train_shards, train=True, rank=groups.dp_rank, world_size=groups.dp_size)

    state = ckpt.TrainState()
    if cfg.checkpoint.resume:
        tag = ckpt.resolve(cfg.run.dir, cfg.checkpoint.resume)
        if tag is None:
            _say(runtime, f"no checkpoint in {ckpt.checkpoint_root(cfg.run.dir)} yet: starting fresh")
        else:
            state = ckpt.load(engine, cfg.run.dir, tag, runtime.env.rank)
            try:
                loader.load_state_dict(state.loader)
            except LoaderStateError as e:  # the data config changed since the checkpoint
                raise ConfigError(f"cannot resume {tag}: {e}") from e
            _say(runtime, f"resumed from {os.path.join(ckpt.checkpoint_root(cfg.run.dir), tag)} at step {state.step}")

    tracker = Tracker(cfg.tracking, active=runtime.is_main)
    state.mlflow_run_id = tracker.start(cfg.run.name or os.path.basename(os.path.abspath(cfg.run.dir)),
                                        cfg.flat(), cfg.to_toml(), run_id=state.mlflow_run_id, step=state.step)
    try:
        result = _loop(cfg, runtime, engine, loader, state, tracker)
        if cfg.run.eval_at_end:
            result.eval = _evaluate(cfg, runtime, engine, val_shards, tracker, state.step)
        if cfg.run.export_at_end:
            result.export_dir = _export(cfg, runtime, engine, state, tracker)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        destroy_groups(groups)
    tracker.finish()
    result.mlflow_run_id, result.tracking_uri = tracker.run_id, tracker.uri if tracker.active else None
    if runtime.is_main:
        _summary(cfg, result)
    return result


def _peak(cfg: Config, runtime: Runtime) -> float | None:
    if cfg.tracking.peak_tflops:
        return cfg.tracking.peak_tflops
    if runtime.device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(runtime.device), cfg.parallel.precision)


def _loop(cfg: Config, runtime: Runtime, engine, loader, state: ckpt.TrainState, tracker: Tracker) -> TrainResult:
    groups, world = runtime.groups, runtime.env.world_size
    loss_fn = build_loss(cfg.loss.kind, groups.dp_group, cfg.loss.gather_with_grad, cfg.loss.local_loss,
                         cfg.loss.tile_size)
    accum = cfg.optim.grad_accum
    samples_per_step = cfg.data.batch_size * accum * groups.dp_size
    flops_per_sample, peak = train_flops_per_sample(get_preset(cfg.model.preset)), _peak(cfg, runtime)
    first_step, losses, pending = state.step, [], []
    last_ckpt = None
    batches = iter(loader)
    engine.train()
    bar = tqdm(total=cfg.run.steps, initial=state.step, disable=not runtime.is_main, unit="step",
               dynamic_ncols=True, mininterval=1.0, desc="train")
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    norm_s0, throughput = None, {}
    optimizer, rank, in_a_row = engine.client_optimizer, runtime.env.rank, 0  # our GuardedAdamW
    while state.step < cfg.run.steps:
        log_now = (state.step + 1) % cfg.run.log_every == 0 or state.step + 1 == cfg.run.steps
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t0
            image = batch["image"].to(runtime.device, runtime.dtype, non_blocking=True)
            text = batch["text"].to(runtime.device, non_blocking=True)
            img, txt, scale, bias = engine(image, text)
            loss = faults.poison("loss", state.step + 1, rank, loss_fn(img, txt, scale, bias))
            optimizer.request_skip(~torch.isfinite(loss.detach()))  # decided with every rank at the step
            engine.backward(loss)
            if log_now and engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
                norm_s0 = grad_norm(engine.module, groups)  # DeepSpeed reports none at stage 0
            if engine.is_gradient_accumulation_boundary():
                optimizer.expect_step()
            engine.step()
            pending.append(loss.detach())
        optimizer.end_step()
        state.step += 1
        state.samples += samples_per_step
        faults.hit("step", state.step, rank)
        if optimizer.skipped_last:  # non-finite loss or gradients on some rank: nobody updated
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
            step_losses = torch.stack(pending).float().view(-1, accum).mean(dim=1)
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
                "loss": sum(finite) / len(finite) if finite else float("nan"),
                "skipped_steps": state.skipped_steps,
                "lr": engine.get_lr()[0],
                "logit_scale": float(scale.detach()),
                "samples_per_s": sps,
                "samples_per_s_per_device": sps / world,
                "tflops_per_device": sps / world * flops_per_sample / 1e12,
                "data_wait_frac": data_wait / elapsed,
                "samples": state.samples,
            }
            if bias is not None:
                metrics["logit_bias"] = float(bias.detach())
            if peak:
                metrics["mfu"] = metrics["tflops_per_device"] / peak
            norm = global_grad_norm(engine) if engine.zero_optimization_stage() else norm_s0
            if norm is not None:
                metrics["grad_norm"] = norm
            metrics.update({f"data/skipped_{k}": v for k, v in loader.skipped.items()})
            tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=state.step)
            throughput = {k: metrics[k] for k in ("samples_per_s", "samples_per_s_per_device", "tflops_per_device",
                                                  "mfu") if k in metrics}
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", sps=f"{metrics['samples_per_s']:.0f}",
                            lr=f"{metrics['lr']:.2e}", refresh=False)
            window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        if state.step % cfg.checkpoint.every == 0 or state.step == cfg.run.steps:
            state.loader = loader.state_dict()
            last_ckpt = ckpt.save(engine, cfg.run.dir, state, runtime.env.rank, keep=cfg.checkpoint.keep)
    bar.close()
    if last_ckpt is None:
        tag = ckpt.resolve(cfg.run.dir, "latest")
        last_ckpt = os.path.join(ckpt.checkpoint_root(cfg.run.dir), tag) if tag else None
    return TrainResult(step=state.step, losses=losses, first_step=first_step, checkpoint=last_ckpt, export_dir=None,
                       throughput=throughput)


def _evaluate(cfg: Config, runtime: Runtime, engine, shards: str, tracker: Tracker, step: int) -> dict[str, float]:
    groups = runtime.groups
    loader = build_loader(cfg, shards, train=False, rank=groups.dp_rank, world_size=groups.dp_size)
    engine.eval()
    img, txt = embed_split(engine, loader, runtime.device, runtime.dtype, groups.dp_group)
    engine.train()
    metrics = retrieval_metrics(img, txt)
    metrics["n"] = float(img.shape[0])
    metrics["chance_recall_at_1"] = 1.0 / img.shape[0]
    tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=step)
    return metrics


def _export(cfg: Config, runtime: Runtime, engine, state: ckpt.TrainState, tracker: Tracker) -> str:
    full = consolidated_state_dict(engine, runtime.groups)  # a collective: every rank takes part
    out_dir = os.path.join(cfg.run.dir, "export")
    if runtime.is_main:
        source = {"run_dir": os.path.abspath(cfg.run.dir), "step": state.step, "samples": state.samples,
                  "mlflow_run_id": state.mlflow_run_id, "tracking_uri": tracker.uri if tracker.active else None}
        export_encoder(full, get_preset(cfg.model.preset), cfg.model.preset, out_dir, source)
        tracker.log_artifacts(out_dir, "export")
    return out_dir


def _summary(cfg: Config, result: TrainResult) -> None:
    lines = [f"trained to step {result.step} of {cfg.run.steps}"]
    if result.losses:
        lines.append(f"loss: {result.losses[0]:.4f} (step {result.first_step + 1}) -> {result.losses[-1]:.4f}")
    if result.throughput:
        t = result.throughput
        mfu = f", MFU {t['mfu']:.1%}" if "mfu" in t else ""
        lines.append(f"throughput: {t['samples_per_s']:.0f} samples/s ({t['samples_per_s_per_device']:.0f} per device, "
                     f"{t['tflops_per_device']:.2f} model TFLOP/s per device{mfu})")
    if result.eval:
        e = result.eval
        lines.append(f"held-out retrieval on {int(e['n'])} pairs: image->text recall@1 {e['i2t_recall_at_1']:.3f}, "
                     f"text->image recall@1 {e['t2i_recall_at_1']:.3f} (chance {e['chance_recall_at_1']:.3f})")
    if result.checkpoint:
        lines.append(f"checkpoint: {os.path.abspath(result.checkpoint)}")
    if result.export_dir:
        lines.append(f"export:     {os.path.abspath(result.export_dir)}")
    if result.mlflow_run_id:
        uri = result.tracking_uri or ""
        if uri.startswith("sqlite:///"):
            uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
        lines.append(f"mlflow:     {uri} (run {result.mlflow_run_id}; view with `mlflow ui --backend-store-uri {uri}`)")
    tqdm.write("\n".join(lines))
