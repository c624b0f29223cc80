"""``mtx-dist shards``: write WebDataset shards from a folder or table, index existing tars, or
generate the demo data."""

from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(text: str) -> int:
    """``1000000``, ``500M``, ``1G`` (binary units) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1000000, 500M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _run_demo(args: argparse.Namespace) -> int:
    from mtx_data_pipelines.demo import DemoSpec, shard_spec, write_demo_split

    per_shard = 1024 if args.samples_per_shard is None else args.samples_per_shard
    paths = write_demo_split(args.output, DemoSpec(args.split, args.samples, per_shard, args.image_px,
                                                   args.seed, distinct=args.distinct))
    print(f"wrote {args.samples} samples in {len(paths)} shards: {shard_spec(paths)}")
    return 0


def _progress(every: int = 10_000):
    def report(seen: int, written: int) -> None:
        if seen % every == 0:
            print(f"  {seen} read, {written} written", file=sys.stderr, flush=True)
    return report


def summary(manifest: dict) -> str:
    t = manifest["totals"]
    mib = t["bytes"] / (1 << 20)
    lines = []
    if manifest["source"]["kind"] == "wds":
        lines.append(f"indexed {t['samples']} samples in {t['shards']} existing shards ({mib:.1f} MiB)"
                     + (f"; {t['bad_shards']} unreadable shards left out" if t.get("bad_shards") else ""))
        bad = "bad samples (left in place; the loader skips them)"
    else:
        lines.append(f"wrote {t['samples']} samples in {t['shards']} shards ({mib:.1f} MiB)")
        bad = "rejected"
    rej = manifest["rejected"]
    lines.append(f"{bad}: {t['rejected']}" + (" (" + ", ".join(f"{k}={v}" for k, v in rej.items()) + ")"
                                             if rej else ""))
    if manifest.get("ignored_files"):
        lines.append("ignored files: " + ", ".join(f"{k}={v}" for k, v in manifest["ignored_files"].items()))
    if manifest["source"].get("note"):
        lines.append("note: " + manifest["source"]["note"])
    lines.append(f"data.train={manifest['spec']}" if manifest["spec"] else "no shards written")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.input == "demo":
        return _run_demo(args)
    from mtx_data_pipelines.transforms import DEFAULT_MAX_PIXELS
    from mtx_data_pipelines.writer import ImageOptions, WriterOptions, write_shards

    def given(value, default):
        return default if value is None else value

    opts = WriterOptions(
        samples_per_shard=given(args.samples_per_shard, 10_000), max_shard_bytes=args.max_shard_bytes,
        image=ImageOptions(reencode=args.reencode, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                           keep_format=args.keep_format, max_pixels=given(args.max_pixels, DEFAULT_MAX_PIXELS)),
        workers=args.workers, shard_prefix=args.shard_prefix, shuffle=args.shuffle, seed=args.seed,
        overwrite=args.overwrite, image_column=args.image_column, caption_column=args.caption_column,
        label_column=args.label_column, image_root=args.image_root,
    )
    manifest = write_shards(args.input, args.output, opts, kind=args.kind, progress=_progress())
    print(summary(manifest))
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "shards", help="write WebDataset shards (folder, table, existing tars, or demo data)",
        description="Write verified WebDataset shards (KEY.jpg + KEY.txt [+ KEY.cls] + KEY.json), a DALI "
                    "index per shard and manifest.json. --input is a folder of images with <stem>.txt "
                    "captions, a .csv/.tsv/.parquet table, a folder of existing .tar shards (index only, "
                    "no rewrite), or 'demo' (generated shapes).")
    s.add_argument("--input", default="demo", help="folder, table file, folder of .tar shards, or 'demo'")
    s.add_argument("--output", required=True, help="output directory")
    s.add_argument("--kind", default="auto", choices=("auto", "folder", "table", "wds"),
                   help="what --input is (auto: a table by its suffix, 'wds' for a folder holding .tar files)")
    w = s.add_argument_group("shards")
    w.add_argument("--samples-per-shard", "--per-shard", dest="samples_per_shard", type=int,
                   help="samples per shard (default 10000; demo 1024)")
    w.add_argument("--max-shard-bytes", type=byte_size, default=1 << 30,
                   help="close a shard before it would exceed this size (e.g. 500M; default 1G)")
    w.add_argument("--shard-prefix", default="shard", help="shards are named PREFIX-000000.tar ...")
    w.add_argument("--workers", type=int, default=1, help="processes that read, verify and re-encode images")
    w.add_argument("--shuffle", action="store_true", help="write samples in a random order (by --seed)")
    w.add_argument("--overwrite", action="store_true", help="replace shards of the same prefix in --output")
    i = s.add_argument_group("images")
    i.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG (default: JPEG "
                   "bytes pass through unchanged; other formats become JPEG)")
    i.add_argument("--max-side", type=int, default=0, help="downscale (and re-encode) images whose longer "
                   "side exceeds this many pixels (0 = keep size)")
    i.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs")
    i.add_argument("--keep-format", action="store_true", help="store PNG/WebP as .png/.webp instead of "
                   "converting them to JPEG")
    i.add_argument("--max-pixels", type=int, help="reject images with more pixels (decompression bombs; "
                   "default: PIL's limit, as the training loader)")
    t = s.add_argument_group("tables")
    t.add_argument("--image-column", help="column of image paths (default: first of image, image_path, "
                   "filepath, path, file, filename, ...)")
    t.add_argument("--caption-column", help="column of captions (default: first of caption, text, title, ...)")
    t.add_argument("--label-column", help="integer class label column, written as KEY.cls (not guessed: a "
                   "column named 'label' without this option is reported, not stored)")
    t.add_argument("--image-root", help="relative image paths resolve against this (default: the table's folder)")
    d = s.add_argument_group("demo (--input demo)")
    d.add_argument("--split", default="train")
    d.add_argument("--samples", type=int, default=4096)
    d.add_argument("--image-px", type=int, default=80)
    d.add_argument("--distinct", action="store_true", help="every sample a different scene")
    s.add_argument("--seed", type=int, default=0, help="seed of --shuffle and of the demo data")
    s.set_defaults(func=_run)
