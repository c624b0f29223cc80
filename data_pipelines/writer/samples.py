"""Turning one source record into the files of one WebDataset sample, or a named rejection.

Runs in pool workers: everything here is a pure function of its (picklable) inputs, so the bytes
written never depend on which process prepared a sample.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field

from PIL import Image

from mtx_data_pipelines.records import Unusable, caption_text, label_value
from mtx_data_pipelines.transforms import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb

# Formats stored as they are without --reencode; every other decodable format becomes JPEG.
PASSTHROUGH_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageOptions:
    reencode: bool = False  # re-encode every image to JPEG (else JPEG bytes pass through unchanged)
    max_side: int = 0  # longer side above this: downscale and re-encode (0 = no limit)
    jpeg_quality: int = 95
    keep_format: bool = False  # pass PNG/WebP through as .png/.webp instead of converting to JPEG
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Candidate:
    """One would-be sample, as a source describes it (nothing read yet)."""

    source: str  # what a person recognises: a relative path or "table.csv:row 17"
    image_path: str | None
    caption: str | None = None  # caption text (tables); None with caption_path None = no caption
    caption_path: str | None = None  # sidecar .txt file (folders)
    image_bytes: bytes | None = None  # an image stored in the table itself (parquet binary column)
    label: object = None
    has_label: bool = False  # the source has a label column: a missing value is then an error
    extra: dict = field(default_factory=dict)  # further columns, kept in KEY.json


# A rejected record is an unusable sample: one error type and one set of caption and label rules
# (mtx_data_pipelines.records) for the writer and every reader.
Rejected = Unusable


def decode_detail(e: DecodeError) -> str:
    """The message without its reason prefix or object addresses (rejection logs stay reproducible)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(e).removeprefix(f"{e.reason}: ").removeprefix(e.reason))


def encode_image(data: bytes, opts: ImageOptions) -> tuple[str, bytes, tuple[int, int]]:
    """Verify ``data`` decodes (within the pixel limit) and return (extension, bytes to store, size)."""
    try:
        img = decode_rgb(data, opts.max_pixels)
        fmt = Image.open(io.BytesIO(data)).format
    except DecodeError as e:
        raise Rejected(e.reason, decode_detail(e)) from None
    size = img.size
    too_big = opts.max_side > 0 and max(size) > opts.max_side
    passthrough = fmt == "JPEG" or (opts.keep_format and fmt in PASSTHROUGH_EXT)
    if passthrough and not opts.reencode and not too_big:
        return PASSTHROUGH_EXT[fmt], data, size
    if too_big:
        scale = opts.max_side / max(size)
        img = img.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.jpeg_quality)
    return "jpg", buf.getvalue(), size


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def prepare(c: Candidate, opts: ImageOptions) -> dict:
    """The files of one sample (extension -> bytes, without the key), or raise :class:`Rejected`.

    Checks run cheapest first and the first failure names the rejection: image file, caption,
    label, then the image decode.
    """
    if c.image_bytes is None and c.image_path and "://" in c.image_path:
        raise Rejected("remote_image_url", c.image_path)
    if c.image_bytes is None and (not c.image_path or not os.path.isfile(c.image_path)):
        raise Rejected("missing_image_file", c.image_path or ("caption file without an image" if c.caption_path
                                                              else "no image path"))
    if c.caption_path is not None:
        if not os.path.isfile(c.caption_path):  # a FIFO or device would block the read
            raise Rejected("missing_caption", f"{c.caption_path} is not a regular file")
        try:
            text = caption_text(_read(c.caption_path))
        except OSError as e:
            raise Rejected("missing_caption", str(e)) from None
    else:
        text = caption_text(c.caption)
    label = label_value(c.label) if c.has_label else None
    try:
        data = c.image_bytes if c.image_bytes is not None else _read(c.image_path)
    except OSError as e:
        raise Rejected("missing_image_file", str(e)) from None
    ext, stored, (w, h) = encode_image(data, opts)
    meta = {**c.extra, "source": c.source, "width": w, "height": h}
    files = {ext: stored, "txt": text.encode("utf-8")}
    if label is not None:
        files["cls"] = str(label).encode("ascii")  # WebDataset convention: ASCII integer
        meta["label"] = label
    files["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return files


def prepare_batch(opts: ImageOptions, batch: list[Candidate]) -> list[tuple]:
    """``("ok", files)`` or ``("rejected", reason, detail)`` per candidate, in order."""
    out: list[tuple] = []
    for c in batch:
        try:
            out.append(("ok", prepare(c, opts)))
        except Rejected as r:
            out.append(("rejected", r.reason, r.detail))
    return out
