"""Where samples come from: a folder of images with sidecar captions, or a CSV/TSV/parquet table.

Each source yields :class:`Candidate` records in a fixed order (sorted paths, table row order), so
the same input always gives the same shards.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterator

from mtx_data_pipelines.writer.errors import ShardWriterError
from mtx_data_pipelines.writer.samples import Candidate

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".parquet")
# Column names tried, in order, when --image-column / --caption-column are not given
# (img2dataset, OpenCLIP's CsvDataset, LAION parquet and common hand-made tables).
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_path", "path", "file", "filename", "img", "jpg")
CAPTION_COLUMNS = ("caption", "text", "title", "txt", "description", "sentence")


def detect_kind(source: str) -> str:
    """``folder`` (images + .txt), ``table`` (csv/tsv/parquet file) or ``wds`` (a folder of tars)."""
    if not os.path.exists(source):
        raise ShardWriterError(f"--input {source!r} does not exist")
    if os.path.isfile(source):
        if source.lower().endswith(TABLE_SUFFIXES):
            return "table"
        raise ShardWriterError(f"--input {source!r} is a file but not a table ({', '.join(TABLE_SUFFIXES)})")
    if any(name.endswith(".tar") for name in os.listdir(source)):
        return "wds"
    return "folder"


# -- folders ------------------------------------------------------------------------------------
def folder_candidates(root: str, ignored: Counter) -> Iterator[Candidate]:
    """Every image under ``root`` (sorted walk) with its sidecar ``<stem>.txt``. A caption file with
    no image beside it becomes a ``missing_image_file`` rejection; other files are counted in
    ``ignored`` (they are not samples)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        stems_with_image = set()
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if suffix.lower() in IMAGE_SUFFIXES:
                stems_with_image.add(stem)
                txt = stem + ".txt"
                yield Candidate(source=rel, image_path=os.path.join(dirpath, name),
                                caption_path=os.path.join(dirpath, txt) if txt in names else None)
            elif suffix != ".txt":
                ignored["not_an_image_or_caption"] += 1
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            if suffix == ".txt" and stem not in stems_with_image:
                yield Candidate(source=os.path.relpath(os.path.join(dirpath, name), root), image_path=None,
                                caption_path=os.path.join(dirpath, name))


# -- tables -------------------------------------------------------------------------------------
def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, table: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ShardWriterError(f"{table}: no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    lower = {c.lower(): c for c in columns}
    for name in defaults:
        if name in lower:
            return lower[name]
    raise ShardWriterError(f"{table}: found no {what} column among {', '.join(columns)}; "
                           f"name it with --{what}-column (tried {', '.join(defaults)})")


def _rows(path: str) -> tuple[list[str], Iterator[dict]]:
    if path.lower().endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ShardWriterError("reading parquet needs pyarrow (pip install pyarrow)") from None
        pf = pq.ParquetFile(path)
        columns = list(pf.schema_arrow.names)
        return columns, (row for batch in pf.iter_batches(batch_size=4096) for row in batch.to_pylist())
    delimiter = "\t" if path.lower().endswith((".tsv", ".tab")) else ","

    def rows() -> Iterator[dict]:
        # surrogateescape: a row with undecodable bytes is rejected on its own (bad_caption_encoding)
        # instead of aborting the whole table.
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            yield from csv.DictReader(f, delimiter=delimiter)

    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        columns = list(csv.DictReader(f, delimiter=delimiter).fieldnames or [])
    return columns, rows()


def unused_label_column(path: str, label_column: str | None) -> str | None:
    """A column named like a class label ("label", any case) that is not stored as one because no
    ``--label-column`` was given: the writer says so, since ``mtx-dist eval --classes`` needs KEY.cls."""
    if label_column:
        return None
    columns, rows = _rows(path)
    rows.close()
    return next((c for c in columns if c and c.strip().lower() == "label"), None)


def table_columns(path: str, image_column: str | None, caption_column: str | None,
                  label_column: str | None) -> tuple[str, str, str | None]:
    columns, rows = _rows(path)
    rows.close()
    name = os.path.basename(path)
    image = _pick(columns, image_column, IMAGE_COLUMNS, "image", name)
    caption = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", name)
    label = _pick(columns, label_column, (), "label", name) if label_column else None
    return image, caption, label


def table_candidates(path: str, image_column: str, caption_column: str, label_column: str | None,
                     image_root: str | None = None) -> Iterator[Candidate]:
    """One candidate per row; relative image paths resolve against ``image_root`` (default: the
    table's folder). Other columns travel into ``KEY.json``."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    _, rows = _rows(path)
    used = {image_column, caption_column, label_column}
    name = os.path.basename(path)
    for i, row in enumerate(rows):
        image, data = row.get(image_column), None
        if isinstance(image, dict):  # Hugging Face datasets' image struct: {"bytes": ..., "path": ...}
            image, data = image.get("path"), image.get("bytes")
        elif isinstance(image, (bytes, bytearray)):
            image, data = None, bytes(image)
        image = str(image).strip() if image is not None else ""
        # URLs stay as they are and are rejected as remote_image_url: downloading is img2dataset's job.
        image_path = image if "://" in image else os.path.join(root, image) if image else None
        extra = {k: v for k, v in row.items() if k not in used and k is not None}
        yield Candidate(source=f"{name}:row {i}", image_path=image_path, image_bytes=data,
                        caption=row.get(caption_column),
                        label=row.get(label_column) if label_column else None,
                        has_label=label_column is not None, extra=_clean(extra))


def _clean(extra: dict) -> dict:
    """JSON-safe copies of extra columns (undecodable CSV bytes become U+FFFD)."""
    out = {}
    for k, v in extra.items():
        if isinstance(v, str):
            v = v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        elif not isinstance(v, (int, float, bool, type(None))):
            v = str(v)
        out[str(k)] = v
    return out
