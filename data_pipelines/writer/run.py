"""Writing shards from a folder or table, and indexing existing WebDataset tars in place.

Samples are prepared (read, verified, re-encoded) in a process pool in chunks, and the chunks are
consumed in submission order by the single writing process, so the shards are byte-identical
for any number of workers.
"""

from __future__ import annotations

import functools
import glob
import json
import multiprocessing
import os
import random
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

from mtx_data_pipelines.files import atomic_open
from mtx_data_pipelines.writer.samples import Candidate, ImageOptions, prepare_batch
from mtx_data_pipelines.writer.sink import ShardSink, brace_spec
from mtx_data_pipelines.writer.sources import (
    ShardWriterError,
    detect_kind,
    folder_candidates,
    table_candidates,
    table_columns,
    unused_label_column,
)

MANIFEST = "manifest.json"
REJECTED_LOG = "rejected.jsonl"
FORMAT_VERSION = 1
_PREFIX = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class WriterOptions:
    samples_per_shard: int = 10_000
    max_shard_bytes: int = 1 << 30
    image: ImageOptions = field(default_factory=ImageOptions)
    workers: int = 1
    shard_prefix: str = "shard"
    shuffle: bool = False
    seed: int = 0
    overwrite: bool = False
    image_column: str | None = None
    caption_column: str | None = None
    label_column: str | None = None
    image_root: str | None = None
    chunk_size: int = 16  # candidates per pool task
    task_timeout_s: float = 600.0  # a chunk not done in this time (a hung mount) aborts the run

    def validate(self) -> None:
        checks = [
            (self.samples_per_shard >= 1, "--samples-per-shard must be >= 1"),
            (self.max_shard_bytes >= 10240, "--max-shard-bytes must be >= 10240 (one tar record)"),
            (self.workers >= 1, "--workers must be >= 1"),
            (1 <= self.image.jpeg_quality <= 100, "--jpeg-quality must be in 1..100"),
            (self.image.max_side >= 0, "--max-side must be >= 0"),
            (self.image.max_pixels >= 1, "--max-pixels must be >= 1"),
            (bool(_PREFIX.fullmatch(self.shard_prefix)), "--shard-prefix may hold only letters, digits, _ and -"),
            (self.chunk_size >= 1 and self.task_timeout_s > 0, "chunk_size and task_timeout_s must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ShardWriterError(message)


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ordered_map(fn: Callable[[list], list], chunks: Iterable[list], workers: int, timeout: float) -> Iterator:
    """``fn`` over chunks, results flattened in input order; at most ``4 * workers`` chunks in flight
    (Executor.map would submit the whole input at once)."""
    if workers <= 1:
        for chunk in chunks:
            yield from fn(chunk)
        return
    # fork (as torch's DataLoader does on Linux): "spawn" would re-import the parent's main module in
    # every worker, and the CLI's imports torch, seconds per worker for code that needs only PIL.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result(timeout=timeout)
        while pending:
            yield from pending.popleft().result(timeout=timeout)
    except BaseException:
        # A worker stuck in a read (a hung mount) would make shutdown(wait=True) wait forever:
        # end the workers first. Executors expose no way to do that before Python 3.14.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _prepare_output(out_dir: str, prefix: str, overwrite: bool) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest) and not overwrite:
        raise ShardWriterError(f"{out_dir} already holds a {MANIFEST} (one output folder per dataset); "
                               "pass --overwrite to replace it")
    old = sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")))
    if old and not overwrite:
        raise ShardWriterError(f"{out_dir} already holds {len(old)} '{prefix}-*.tar' shards; "
                               "pass --overwrite to replace them or choose another --output/--shard-prefix")
    if os.path.exists(manifest):
        os.unlink(manifest)  # it would describe a mix of old and new shards until the new one is written
    return old


def _write_json(path: str, obj: dict) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def write_shards(source: str, out_dir: str, opts: WriterOptions, kind: str = "auto",
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Write verified samples of a folder or table source into shards; returns the manifest
    (also written to ``out_dir/manifest.json``; every rejection goes to ``rejected.jsonl``).

    ``progress(read, written)`` is called after each candidate. With ``opts.workers > 1`` samples are
    prepared in forked worker processes (spawned where fork does not exist: call from under
    ``if __name__ == "__main__":`` there)."""
    opts.validate()
    kind = detect_kind(source) if kind == "auto" else kind
    if kind == "wds":
        return index_existing(source, out_dir, opts)
    if not os.path.exists(source):
        raise ShardWriterError(f"--input {source!r} does not exist")
    if os.path.isdir(source) and (os.path.abspath(out_dir) + os.sep).startswith(os.path.abspath(source) + os.sep):
        raise ShardWriterError(f"--output {out_dir!r} lies inside --input {source!r}: the shards would "
                               "become part of the input")
    ignored: Counter = Counter()
    if kind == "folder":
        if not os.path.isdir(source):
            raise ShardWriterError(f"--input {source!r} is not a folder")
        candidates: Iterable[Candidate] = folder_candidates(source, ignored)
        source_info = {"kind": "folder", "path": os.path.abspath(source)}
    elif kind == "table":
        columns = table_columns(source, opts.image_column, opts.caption_column, opts.label_column)
        candidates = table_candidates(source, *columns, image_root=opts.image_root)
        source_info = {"kind": "table", "path": os.path.abspath(source),
                       "columns": dict(zip(("image", "caption", "label"), columns))}
        unused = unused_label_column(source, opts.label_column)
        if unused:
            source_info["note"] = (f"column {unused!r} was not stored as class labels (it stays in KEY.json); "
                                   f"pass --label-column {unused} to write KEY.cls")
    else:
        raise ShardWriterError(f"unknown input kind {kind!r}")
    if opts.shuffle:
        candidates = list(candidates)  # a permutation needs the whole list (records only, no bytes)
        random.Random(opts.seed).shuffle(candidates)

    old = _prepare_output(out_dir, opts.shard_prefix, opts.overwrite)
    sink = ShardSink(out_dir, opts.shard_prefix, opts.samples_per_shard, opts.max_shard_bytes)
    rejected: Counter = Counter()
    written = seen = 0
    chunks = _chunks(candidates, opts.chunk_size)
    log_path = os.path.join(out_dir, REJECTED_LOG)
    # Candidates are consumed lazily; their sources must travel with the results for the log.
    sources: deque = deque()

    def tracked(chunks_in: Iterable[list]) -> Iterator[list]:
        for chunk in chunks_in:
            sources.extend(c.source for c in chunk)
            yield chunk

    results = ordered_map(functools.partial(prepare_batch, opts.image), tracked(chunks), opts.workers,
                          opts.task_timeout_s)
    try:
        with atomic_open(log_path) as log:
            for result in results:
                src = sources.popleft()
                seen += 1
                if result[0] == "ok":
                    sink.write(f"{opts.shard_prefix}-{written:09d}", result[1])
                    written += 1
                else:
                    rejected[result[1]] += 1
                    log.write(json.dumps({"source": src, "reason": result[1], "detail": result[2]},
                                         ensure_ascii=False) + "\n")
                if progress is not None:
                    progress(seen, written)
            shards = sink.close()
    except BaseException:
        results.close()  # ends the worker processes now, not when the generator is collected
        sink.abort()
        raise
    _remove_stale(old, {s["name"] for s in shards})
    manifest = _manifest(out_dir, shards, rejected, source_info, opts, seen, ignored)
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def _remove_stale(old: list[str], keep: set[str]) -> None:
    """Shards of an earlier run under the same prefix that this run did not rewrite (--overwrite)."""
    for path in old:
        if os.path.basename(path) not in keep:
            os.unlink(path)
            idx = path[:-4] + ".idx"
            if os.path.exists(idx):
                os.unlink(idx)


def _manifest(out_dir: str, shards: list[dict], rejected: Counter, source_info: dict, opts: WriterOptions,
              candidates: int, ignored: Counter, extra: dict | None = None, shard_dir: str | None = None) -> dict:
    shard_dir = os.path.abspath(shard_dir or out_dir)
    good = [s for s in shards if s.get("error") is None and s["samples"] > 0]
    options = asdict(opts)
    options.pop("chunk_size"), options.pop("task_timeout_s")
    return {
        "format": "mtx-dist-shards", "version": FORMAT_VERSION,
        "source": source_info, "options": options,
        "shards": shards,
        "totals": {"samples": sum(s["samples"] for s in good), "shards": len(good),
                   "bytes": sum(s["bytes"] for s in shards), "candidates": candidates,
                   "rejected": sum(rejected.values())},
        "rejected": dict(sorted(rejected.items())),
        "ignored_files": dict(sorted(ignored.items())),
        "spec": brace_spec(os.path.join(shard_dir, s["name"]) for s in good) if good else "",
        **(extra or {}),
    }


def index_existing(source: str, out_dir: str, opts: WriterOptions) -> dict:
    """Index-only mode for existing WebDataset tars (e.g. img2dataset output): no rewrite. Each tar
    is read through, every sample checked like a new one (counted, not removed: the loader skips
    them too), and a DALI index written to ``out_dir``; the manifest lists the tars where they are."""
    from mtx_data_pipelines.writer.existing import img2dataset_stats

    opts.validate()
    tars = sorted(glob.glob(os.path.join(glob.escape(source), "*.tar")))
    if not tars:
        raise ShardWriterError(f"{source!r} holds no .tar files")
    if os.path.exists(os.path.join(out_dir, MANIFEST)) and not opts.overwrite:
        raise ShardWriterError(f"{out_dir} already holds a {MANIFEST}; pass --overwrite to replace it")
    os.makedirs(out_dir, exist_ok=True)
    fn = functools.partial(_check_tars, opts.image.max_pixels, out_dir)
    shards = list(ordered_map(fn, ([t] for t in tars), opts.workers, opts.task_timeout_s))
    rejected: Counter = Counter()
    with atomic_open(os.path.join(out_dir, REJECTED_LOG)) as log:
        for s in shards:
            rejected.update(s.pop("bad"))
            log.writelines(json.dumps(bad, ensure_ascii=False) + "\n" for bad in s.pop("bad_list"))
    shard_dir = os.path.abspath(source)
    if os.path.abspath(out_dir) != shard_dir:
        for s in shards:  # the index lives elsewhere: name it absolutely
            s["index"] = os.path.abspath(os.path.join(out_dir, s["index"])) if s.get("index") else None
    manifest = _manifest(out_dir, shards, rejected, {"kind": "wds", "path": shard_dir}, opts,
                         sum(s["samples"] for s in shards), Counter(),
                         extra={"source_stats": img2dataset_stats(source)}, shard_dir=shard_dir)
    manifest["totals"]["bad_shards"] = sum(1 for s in shards if s.get("error"))
    manifest["options"] = {"max_pixels": opts.image.max_pixels, "workers": opts.workers}  # all that applies
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def _check_tars(max_pixels: int, out_dir: str, tars: list[str]) -> list[dict]:
    from mtx_data_pipelines.writer.existing import check_tar

    return [check_tar(t, out_dir, max_pixels) for t in tars]
