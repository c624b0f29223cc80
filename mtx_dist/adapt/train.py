"""Train a tokenizer and head on a frozen encoder; predict with a saved adapted model.

A plain single-process loop (AdamW over the tokenizer's and head's parameters only, gradient norm
clipped at 1.0, constant learning rate): adaptation trains a few hundred thousand parameters and
needs none of the pretraining machinery. The weights after the last epoch are saved.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import torch
import torch.nn.functional as F

from mtx_dist.adapt.config import AdaptConfig
from mtx_dist.adapt.data import Inputs, TabularIO, TimeSeriesIO, as_float, encode_targets, split
from mtx_dist.adapt.encoder import FrozenEncoder
from mtx_dist.adapt.errors import AdaptError
from mtx_dist.adapt.files import AudioIO, GrayImageIO, ImageIO, ImuIO, PointCloudIO
from mtx_dist.adapt.graph import GraphIO
from mtx_dist.adapt.hyperspectral import HyperspectralIO
from mtx_dist.adapt.text import TextIO
from mtx_dist.adapt.video import VideoIO
from mtx_dist.adapt.model import AdaptedModel, build_model, load_adapter, save_adapter
from mtx_dist.config import TrackingConfig
from mtx_dist.devices import resolve_device

IO = {"timeseries": TimeSeriesIO, "tabular": TabularIO, "audio": AudioIO, "pointcloud": PointCloudIO,
      "image": ImageIO, "xray": GrayImageIO, "infrared": GrayImageIO, "hyperspectral": HyperspectralIO,
      "imu": ImuIO, "video": VideoIO, "text": TextIO, "graph": GraphIO}


def _loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    return F.cross_entropy(out, y) if task == "classification" else F.mse_loss(out.squeeze(-1), y)


def metrics(out: torch.Tensor, y: torch.Tensor, task: str, target: dict) -> dict[str, float]:
    """Accuracy, or RMSE (in target units) and R^2, of model outputs ``out`` against targets ``y``."""
    if task == "classification":
        return {"accuracy": float((out.argmax(-1) == y).float().mean())}
    pred, true = out.squeeze(-1).double() * target["std"], y.double() * target["std"]
    sse = float(((pred - true) ** 2).sum())
    sst = float(((true - true.mean()) ** 2).sum())
    return {"rmse": math.sqrt(sse / len(y)), "r2": 1 - sse / sst if sst > 0 else float("nan")}


@torch.no_grad()
def infer(model: AdaptedModel, x: torch.Tensor | Inputs, batch_size: int = 64, idx=None) -> torch.Tensor:
    """Model outputs (on the model's device, in chunks, returned on the CPU) for ``x``: a tensor of inputs,
    or :class:`Inputs` with the samples ``idx`` (default: all)."""
    model.eval()
    device = next(model.tokenizer.parameters()).device
    if isinstance(x, torch.Tensor):
        chunks = x.split(batch_size)
    else:
        idx = list(range(len(x))) if idx is None else list(idx)
        chunks = (x(idx[k:k + batch_size]) for k in range(0, len(idx), batch_size))
    return torch.cat([model(chunk.to(device)).cpu() for chunk in chunks])


def train_adapter(cfg: AdaptConfig, tracking: TrackingConfig | None = None, progress: bool = True) -> dict:
    """Fit a tokenizer and head for ``cfg.modality`` on the frozen encoder; save them to ``cfg.out``.

    Returns a summary: sample counts, final metrics, the encoder sha256, the folder written and the
    trained model (in eval mode).
    """
    import tomli_w
    from tqdm import tqdm

    from mtx_dist.tracking import Tracker

    cfg.validate()
    encoder = FrozenEncoder(cfg.encoder, cfg.attention)
    io = IO[cfg.modality]
    raw = io.read(cfg.data, cfg, labelled=True)
    train_idx, val_idx = split(len(raw.items), cfg.val_fraction, cfg.seed)
    pre, settings = io.fit(raw, train_idx, cfg, encoder.manifest)
    x = Inputs(io, raw, pre, settings, int(cfg.cache_gib * 2**30))
    y, target = encode_targets(raw.targets, cfg.task, train_idx)
    outputs = len(target["classes"]) if cfg.task == "classification" else 1
    spec = {"modality": cfg.modality, "task": cfg.task, "tokenizer": settings,
            "head": {"pool": cfg.pool, "outputs": outputs},
            "preprocessing": {"input": pre, "target": {"column": cfg.target, **target}},
            "encoder": {"path": encoder.export_dir, "sha256": encoder.sha256, "width": encoder.width,
                        "depth": encoder.depth, "heads": encoder.heads}}
    device = resolve_device(cfg.device)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = build_model(spec, encoder)
        if hasattr(io, "initialise"):  # tokenizers that start from the pretraining's (mtx_dist.adapt.pretrained)
            io.initialise(model.tokenizer, encoder.export_dir, settings, pre, encoder.manifest)
        model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    summary = {"samples": len(y), "train": len(train_idx), "val": len(val_idx), "outputs": outputs,
               "trainable_params": sum(p.numel() for p in params), "encoder_sha256": encoder.sha256,
               "reading": raw.info}

    tracker = Tracker(tracking or TrackingConfig(), active=True, background=True)
    run_params = {f"adapt.{k}": v for k, v in dataclasses.asdict(cfg).items()}
    run_params.update({"encoder.sha256": encoder.sha256, "samples.train": len(train_idx),
                       "samples.val": len(val_idx), "trainable_params": summary["trainable_params"]})
    summary["run_id"] = tracker.start(f"adapt-{cfg.modality}-{os.path.basename(os.path.abspath(cfg.out))}",
                                      run_params, tomli_w.dumps({"adapt": dataclasses.asdict(cfg)}))
    gen = torch.Generator().manual_seed(cfg.seed)
    tr = torch.tensor(train_idx)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"adapt {cfg.modality}", disable=not progress,
               leave=False)
    status = "FAILED"
    # The epoch saved is the best on validation (accuracy, or RMSE for regression); without a
    # validation split, the last. Only the trainable tensors are kept: the encoder never changes.
    kept = [n for n in model.state_dict() if not n.startswith("encoder.")]  # tokenizer and head
    best, best_epoch, best_state, since_best = None, 0, None, 0
    try:
        for epoch in range(cfg.epochs):
            bar.set_description(f"adapt {cfg.modality} epoch {epoch + 1}/{cfg.epochs}")
            model.train()
            total = 0.0
            for batch in tr[torch.randperm(len(tr), generator=gen)].split(cfg.batch_size):
                loss = _loss(model(x(batch).to(device)), y[batch].to(device), cfg.task)
                if not torch.isfinite(loss):
                    raise AdaptError(f"epoch {epoch + 1}: the loss became {loss.item()}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                total += loss.item() * len(batch)
                bar.update(1)
            logged = {"train_loss": total / len(train_idx)}
            if val_idx:
                logged.update({f"val_{k}": v for k, v in
                               metrics(infer(model, x, idx=val_idx), y[val_idx], cfg.task, target).items()})
            bar.set_postfix({k: f"{v:.3g}" for k, v in logged.items()})
            tracker.log_metrics(logged, step=epoch + 1)
            score = (logged["val_accuracy"] if cfg.task == "classification" else -logged["val_rmse"]) if val_idx \
                else epoch
            score = -math.inf if math.isnan(score) else score
            if best is None or score > best[0]:
                best, best_epoch, since_best = (score, dict(logged)), epoch + 1, 0
                state = model.state_dict()
                best_state = {n: state[n].detach().clone() for n in kept}
            else:
                since_best += 1
                if cfg.patience and since_best >= cfg.patience:
                    break
        model.load_state_dict(best_state, strict=False)
        summary.update(metrics=best[1], best_epoch=best_epoch, epochs_run=epoch + 1)
        spec["training"] = {"config": dataclasses.asdict(cfg), "metrics": best[1], "best_epoch": best_epoch,
                            "epochs_run": epoch + 1, "samples": {"train": len(train_idx), "val": len(val_idx)}}
        summary["out"] = save_adapter(model, spec, cfg.out)
        summary["model"] = model.eval()
        tracker.log_artifacts(cfg.out, "adapter")
        status = "FINISHED"
    finally:
        bar.close()
        tracker.finish(status)
    return summary


def predict(model_dir: str, data: str, out: str | None = None, encoder_dir: str | None = None,
            batch_size: int = 64, device: str = "auto", skip_bad: bool = False) -> dict:
    """Predict for every sample in ``data`` (same layout as in training; the target may be absent).

    Writes ``out`` (CSV: id, prediction, and p_<class> columns for classification) when given;
    returns {"ids", "predictions", "outputs", "metrics" (when the data has targets), "reading"}.
    """
    model, spec = load_adapter(model_dir, encoder_dir, device=resolve_device(device))
    io, pre, settings = IO[spec["modality"]], spec["preprocessing"]["input"], spec["tokenizer"]
    target = spec["preprocessing"]["target"]
    cfg = AdaptConfig(target=target["column"], skip_bad=skip_bad)
    raw = io.read(data, cfg, labelled=False, pre=pre)
    outputs = infer(model, Inputs(io, raw, pre, settings, int(cfg.cache_gib * 2**30)), batch_size)
    result = {"ids": raw.ids, "outputs": outputs, "reading": raw.info, "metrics": None}
    if spec["task"] == "classification":
        classes = target["classes"]
        probs = outputs.softmax(-1)
        result["predictions"] = [classes[i] for i in outputs.argmax(-1).tolist()]
        if raw.targets is not None:
            index = {c: k for k, c in enumerate(classes)}
            known = [i for i, t in enumerate(raw.targets) if str(t) in index]
            if known:
                y = torch.tensor([index[str(raw.targets[i])] for i in known])
                result["metrics"] = {**metrics(outputs[known], y, "classification", target),
                                     "unknown_labels_skipped": len(raw.targets) - len(known)}
        rows = [[i, p, *[f"{v:.6g}" for v in pr]] for i, p, pr in zip(raw.ids, result["predictions"], probs.tolist())]
        header = ["id", "prediction", *[f"p_{c}" for c in classes]]
    else:
        values = (outputs.squeeze(-1).double() * target["std"] + target["mean"]).tolist()
        result["predictions"] = values
        if raw.targets is not None:
            true = torch.tensor([as_float(t, f"target of {i}") for i, t in zip(raw.ids, raw.targets)])
            y = ((true - target["mean"]) / target["std"]).float()
            result["metrics"] = metrics(outputs, y, "regression", target)
        rows = [[i, repr(v)] for i, v in zip(raw.ids, values)]
        header = ["id", "prediction"]
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return result
