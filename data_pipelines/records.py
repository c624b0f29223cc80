"""What makes one WebDataset sample usable: its parts and their rules, in one place.

The CPU loader, the DALI loader, ``mtx-dist eval`` and the shard writer (new shards and checks of
existing ones) all apply these rules, so a sample is accepted or skipped alike wherever it is read,
and a skip is counted under the same reason name everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members, in order of preference
# Every reason a reader skips a sample for (the order of the training loader's all-reduced counters).
SKIP_REASONS = ("tar_error", "unknown_extension", "missing_image", "missing_caption", "empty_caption",
                "bad_caption_encoding", "corrupt_image", "too_many_pixels")
_INTEGER = re.compile(r"[+-]?\d+")


class Unusable(ValueError):
    """A sample (or one part of it) that cannot be used; ``reason`` names its skip counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Record:
    key: str
    image: bytes  # the encoded image member
    caption: str | None  # stripped caption text; None only when captions are optional
    label: int | None  # the .cls class label, when the sample has one and labels are read


def missing_part(exts: set[str] | dict, image_exts: tuple[str, ...] = IMAGE_EXTS) -> str | None:
    """The skip reason of a sample whose members have these extensions, when it lacks its image
    (one of ``image_exts``) or its caption (None: both there)."""
    has_image = any(e in exts for e in image_exts)
    if has_image and "txt" in exts:
        return None
    return "missing_image" if "txt" in exts else "missing_caption" if has_image else "unknown_extension"


def caption_text(raw: object) -> str:
    """A caption from a .txt member's bytes or a table cell: UTF-8, a leading byte-order mark and
    surrounding whitespace removed, not empty."""
    if raw is None:
        raise Unusable("missing_caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Unusable("bad_caption_encoding", str(e)) from None
    elif not isinstance(raw, str):
        raw = str(raw)
    try:  # tables are read with surrogateescape, so undecodable bytes show up here
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise Unusable("bad_caption_encoding", "caption is not valid UTF-8") from None
    text = raw.lstrip("\ufeff").strip()
    if not text:
        raise Unusable("empty_caption")
    return text


def label_value(raw: object) -> int:
    """An integer class label from a .cls member's bytes, an int, an integral float or a decimal string."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise Unusable("bad_label", "not ASCII") from None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise Unusable("missing_label")
    if isinstance(raw, bool):
        raise Unusable("bad_label", repr(raw))
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and _INTEGER.fullmatch(raw.strip()):
        return int(raw.strip())
    raise Unusable("bad_label", repr(raw)[:80])


def parse_sample(sample: dict, caption_required: bool = True) -> Record:
    """The parts of one raw sample (``{"__key__": ..., ext: bytes}``), or :class:`Unusable`.

    Training (``caption_required``): an image and a valid caption; a label is not read. Evaluation:
    an image and a caption or a label (retrieval uses the captions, zero-shot the labels); an empty
    caption then counts as none."""
    if caption_required:
        reason = missing_part(sample)
        if reason:
            raise Unusable(reason)
        return Record(sample["__key__"], _image(sample), caption_text(sample["txt"]), None)
    image = _image(sample)
    caption = None
    if "txt" in sample:
        try:
            caption = caption_text(sample["txt"])
        except Unusable as e:
            if e.reason != "empty_caption":
                raise
    label = label_value(sample["cls"]) if "cls" in sample else None
    if caption is None and label is None:
        raise Unusable("no_caption_or_label")
    return Record(sample["__key__"], image, caption, label)


def _image(sample: dict) -> bytes:
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        raise Unusable("missing_image")
    return image
