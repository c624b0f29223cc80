"""Checking an existing WebDataset tar in place (no rewrite) and writing its DALI index."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

from mtx_data_pipelines.dali_index import (
    DaliIndexError,
    index_path_for,
    scan_tar,
    write_dali_index,
)
from mtx_data_pipelines.transforms import DecodeError, decode_rgb
from mtx_data_pipelines.records import IMAGE_EXTS, caption_text, label_value, missing_part
from mtx_data_pipelines.writer.samples import Rejected, decode_detail
from mtx_data_pipelines.files import sha256_file

STATS_KEYS = ("count", "successes", "failed_to_download", "failed_to_resize")


def _check_sample(files: dict[str, bytes], max_pixels: int) -> None:
    """The readers' rules (mtx_data_pipelines.records), and the image must decode."""
    reason = missing_part(files)
    if reason:
        raise Rejected(reason, "no " + "/".join(IMAGE_EXTS) + " member" if reason == "missing_image" else "")
    image = next(files[e] for e in IMAGE_EXTS if e in files)
    caption_text(files["txt"])
    if "cls" in files:
        label_value(files["cls"])
    try:
        decode_rgb(image, max_pixels)
    except DecodeError as e:
        raise Rejected(e.reason, decode_detail(e)) from None


def check_tar(tar_path: str, out_dir: str, max_pixels: int) -> dict:
    """One manifest record for an existing tar: samples, bad samples by reason, size, sha256 and its
    DALI index (written to ``out_dir``). A tar that is unreadable or cut short gets ``error`` set
    and no index (DALI would read past its end)."""
    name = os.path.basename(tar_path)
    size = os.path.getsize(tar_path)
    record = {"name": name, "samples": 0, "bad_samples": 0, "bytes": size, "sha256": sha256_file(tar_path),
              "index": None, "error": None, "bad": Counter(), "bad_list": []}
    seen: set[str] = set()
    try:
        samples = list(scan_tar(tar_path))
    except DaliIndexError as e:
        record["error"] = str(e)
        return record
    with open(tar_path, "rb") as f:
        for key, members in samples:
            record["samples"] += 1
            if members[-1].offset + members[-1].size > size:
                record["error"] = f"truncated: member {members[-1].name} ends past the end of the file"
                break
            try:
                if key in seen:
                    raise Rejected("duplicate_key", key)
                seen.add(key)
                files = {}
                for m in members:
                    f.seek(m.offset)
                    files[m.ext] = f.read(m.size)
                _check_sample(files, max_pixels)
            except Rejected as r:
                record["bad"][r.reason] += 1
                record["bad_samples"] += 1
                record["bad_list"].append({"source": f"{name}:{key}", "reason": r.reason, "detail": r.detail})
    if record["error"] is not None:
        # the whole shard is left out instead (and listed with its error)
        record["bad"], record["bad_samples"], record["bad_list"] = Counter(), 0, []
    elif record["samples"] == 0:
        record["error"] = "no samples"
    else:
        index = os.path.join(out_dir, os.path.basename(index_path_for(tar_path)))
        record["index"] = os.path.basename(write_dali_index(tar_path, index))
    return record


def img2dataset_stats(folder: str) -> dict:
    """Sums of img2dataset's per-shard ``*_stats.json`` counters (empty when there are none)."""
    totals: Counter = Counter()
    files = sorted(glob.glob(os.path.join(glob.escape(folder), "*_stats.json")))
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                stats = json.load(f)
        except (OSError, ValueError):
            totals["unreadable_stats_files"] += 1
            continue
        for k in STATS_KEYS:
            if isinstance(stats.get(k), int):
                totals[k] += stats[k]
    return {"stats_files": len(files), **dict(totals)} if files else {}
