"""``mtx-dist eval``: retrieval recall@K and zero-shot accuracy of a run, checkpoint or OpenCLIP export."""

from __future__ import annotations

import argparse

from mtx_dist.prompts import TEMPLATES


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive integer")
    return int(text)


def _run(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from mtx_data_pipelines.tokenizer import TEXT_PAD_MULTIPLE, ClipTokenizer
    from mtx_dist.config import TrackingConfig
    from mtx_dist.evaluate import EvalDataError, evaluate_shards, read_classnames
    from mtx_dist.export.source import load_any
    from mtx_dist.tracking import Tracker

    classnames = read_classnames(args.classes) if args.classes else None
    try:
        from mtx_data_pipelines.loader import list_shards
        list_shards(args.data)
    except (FileNotFoundError, ValueError) as e:
        raise EvalDataError(f"--data {args.data!r}: {e}") from None
    source = load_any(args.source, args.preset)
    from mtx_dist.devices import resolve_device
    device = resolve_device(args.device)
    model = source.model().to(device)
    tokenizer = ClipTokenizer(context_length=source.spec.text.context_length)

    def tokenize(texts: list[str]) -> torch.Tensor:  # trimmed: the same features as full-length padding
        return torch.from_numpy(tokenizer(texts, pad_multiple=TEXT_PAD_MULTIPLE))

    metrics = evaluate_shards(model, args.data, tokenize, classnames, TEMPLATES[args.templates], args.batch_size,
                              device)

    what = source.info.get("checkpoint") or os.path.basename(os.path.normpath(args.source))
    print(f"eval of {source.preset} from {os.path.abspath(args.source)} ({what}) on {args.data}")
    n = int(metrics["n_retrieval"])
    if n:
        ks = [k for k in (1, 5, 10) if f"i2t_recall_at_{k}" in metrics]
        print(f"retrieval on {n} image-caption pairs, {int(metrics['distinct_captions'])} distinct captions "
              f"(identical captions are one target; chance recall@1 {metrics['chance_recall_at_1']:.4f}):")
        for name, label in (("i2t", "image->text"), ("t2i", "text->image")):
            print(f"  {label}: " + "  ".join(f"R@{k} {metrics[f'{name}_recall_at_{k}']:.4f}" for k in ks))
    if "n_zeroshot" in metrics:
        accs = "  ".join(f"top-{k} {metrics[f'zeroshot_top{k}']:.4f}" for k in (1, 5) if f"zeroshot_top{k}" in metrics)
        print(f"zero-shot on {int(metrics['n_zeroshot'])} labelled images, {len(classnames)} classes, "
              f"{len(TEMPLATES[args.templates])} templates ({args.templates}): {accs}")
    skips = {k[len("skipped_"):]: int(v) for k, v in metrics.items() if k.startswith("skipped_")}
    if skips:
        print("skipped samples: " + ", ".join(f"{k} {v}" for k, v in skips.items()))
    if args.json:
        print("metrics: " + json.dumps(metrics, sort_keys=True))

    if not args.no_tracking:
        cfg = source.cfg.tracking if source.cfg is not None else TrackingConfig()
        if args.tracking_uri:
            cfg.uri = args.tracking_uri
        tracker = Tracker(cfg, active=True)
        params = {"eval.source": os.path.abspath(args.source), "eval.data": args.data, "eval.templates": args.templates,
                  "eval.preset": source.preset, "eval.classes": args.classes or "",
                  **{f"source.{k}": v for k, v in source.info.items() if v is not None}}
        tracker.start(f"eval-{what}", params, source.cfg.to_toml() if source.cfg is not None else "")
        from mtx_dist import shard_sets
        tracker.log_dataset(shard_sets.describe(args.data), "evaluation")
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=int(source.info.get("step") or 0))
        tracker.finish()
        if tracker.run_id:
            print(f"mlflow: {tracker.uri} (run {tracker.run_id})")
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="retrieval recall@K and zero-shot accuracy on WebDataset shards",
                       description="Image<->text retrieval recall@1/5/10 over samples with a caption (.txt) and, "
                                   "with --classes, zero-shot top-1/top-5 accuracy over samples with an integer "
                                   "label (.cls). Prints the numbers and logs them to MLflow.")
    e.add_argument("source", help="run directory, checkpoint directory, or an export made with --format open_clip")
    e.add_argument("--data", required=True, help="WebDataset shards (brace lists allowed)")
    e.add_argument("--classes", help="file with one class name per line (label i = line i)")
    e.add_argument("--batch-size", type=_positive, default=64, help="images or texts per forward pass (default 64)")
    e.add_argument("--templates", choices=tuple(TEMPLATES), default="openai",
                   help="zero-shot prompts: 'openai' (a short ensemble) or 'simple' (one prompt)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--preset", help="model preset, only for checkpoints saved without their config.toml")
    e.add_argument("--json", action="store_true", help="also print every metric as one JSON line")
    e.add_argument("--tracking-uri", help="MLflow store (default: the run's tracking config, else "
                                          "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    e.add_argument("--no-tracking", "--no-track", dest="no_tracking", action="store_true",
                   help="do not log to MLflow (the same flag as adapt train's; --no-track is kept as an alias)")
    e.set_defaults(func=_run)
