"""``mtx-dist adapt``: train a Data2Seq tokenizer + head for a new modality on a frozen encoder
export (``adapt train``), and predict with the result (``adapt predict``)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mtx_dist.adapt.config import DEVICES, REQUIRED, AdaptConfig
from mtx_dist.adapt.errors import AdaptError


def _train(args: argparse.Namespace) -> int:
    from mtx_dist.adapt.train import train_adapter
    from mtx_dist.config import TrackingConfig, describe_section

    if args.help_config:
        print("\n".join(describe_section(AdaptConfig, "adapt")))
        return 0
    missing = [f"--{name}" for name in REQUIRED if getattr(args, name) is None]
    if missing:
        raise AdaptError(f"the following arguments are required: {', '.join(missing)}")
    cfg = AdaptConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AdaptConfig)})
    tracking = TrackingConfig(enabled=not args.no_tracking, uri=args.tracking_uri, experiment=args.experiment)
    s = train_adapter(cfg, tracking, progress=not args.quiet)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in s["metrics"].items())
    print(f"adapted {cfg.modality} ({cfg.task}, {s['outputs']} outputs): {s['train']} training / {s['val']} "
          f"validation samples, {s['trainable_params']} trainable parameters")
    print(f"reading: {json.dumps(s['reading'], sort_keys=True)}")
    print(f"final epoch: {shown}")
    print(f"saved: {s['out']} (encoder sha256 {s['encoder_sha256']})")
    if s["run_id"]:
        print(f"mlflow: run {s['run_id']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mtx_dist.adapt.train import predict

    r = predict(args.model, args.data, out=args.out, encoder_dir=args.encoder, batch_size=args.batch_size,
                device=args.device, skip_bad=args.skip_bad)
    print(f"predicted {len(r['ids'])} samples" + (f" -> {args.out}" if args.out else ""))
    print(f"reading: {json.dumps(r['reading'], sort_keys=True)}")
    if r["metrics"]:
        print("metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items()))
    if not args.out:
        for i, p in zip(r["ids"], r["predictions"]):
            print(f"{i},{p}")
    return 0


def register(sub) -> None:
    a = sub.add_parser("adapt", help="adapt the frozen encoder to a new modality (train / predict)",
                       description="Meta-Transformer modality adaptation: a Data2Seq tokenizer and a task head "
                                   "are trained on top of a frozen exported encoder.")
    verbs = a.add_subparsers(dest="adapt_command", required=True)
    t = verbs.add_parser("train", help="train a tokenizer + head on a frozen encoder export",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(AdaptConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            t.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        t.add_argument(flag, dest=f.name, type=kind, default=None if f.name in REQUIRED else f.default,
                       choices=f.metadata.get("choices"), help=f.metadata["help"] + (" (required)" if f.name in
                                                                                       REQUIRED else ""))
    t.add_argument("--help-config", action="store_true", help="print every option as a typed config section "
                   "(defaults, choices, help) and exit")
    t.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    t.add_argument("--tracking-uri", default="", help="MLflow tracking URI ('' = $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db here)")
    t.add_argument("--experiment", default="mtx-dist-adapt", help="MLflow experiment name")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    p = verbs.add_parser("predict", help="predict with a saved adapted model")
    p.add_argument("--model", required=True, help="folder with adapter.safetensors + adapter.json")
    p.add_argument("--data", required=True, help="data in the layout used for training (targets optional)")
    p.add_argument("--out", help="CSV to write (id, prediction[, p_<class>...]); default: print")
    p.add_argument("--encoder", help="encoder export folder, if it moved since training (same sha256 required)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when available, else cpu")
    p.add_argument("--skip-bad", action="store_true", help="folders: leave out (and count) unreadable files")
    p.set_defaults(func=_predict)
