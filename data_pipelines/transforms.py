"""CPU image decode and augmentation with PIL + numpy (no torchvision at run time).

Semantics follow OpenCLIP's image transforms: RandomResizedCrop(scale=(0.9, 1.0), bicubic) for
training, shortest-side bicubic resize + center crop for evaluation, CLIP mean/std, RGB, CHW float32.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

from mtx_data_pipelines.records import Unusable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold

# x / 255 - mean) / std as one multiply-add per channel (half the passes over the pixels)
_SCALE = (1.0 / (255.0 * np.array(CLIP_STD, dtype=np.float64))).astype(np.float32)
_OFFSET = (-np.array(CLIP_MEAN, dtype=np.float64) / np.array(CLIP_STD, dtype=np.float64)).astype(np.float32)


class DecodeError(Unusable):
    """An image that cannot (or must not) be decoded; ``reason`` names the skip counter."""


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of a JPEG's frame header (SOF), read by walking its marker segments
    up to the first scan as libjpeg does; None for anything else (not a JPEG, a header cut short, bytes
    between segments, a marker without a length field such as RSTn, TEM or EOI, precision other than 8
    bits, a second frame header), which :func:`decode_rgb` then leaves to ``Image.open``."""
    if data[:2] != b"\xff\xd8":
        return None
    frame, i, n = None, 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the frame header came before it
            return frame
        if marker not in _SEGMENTS:  # not a segment with a length field: no guessing where the next one is
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if frame is not None or length < 8 or i + 10 > n or data[i + 4] != 8:
                return None
            frame = ((data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6], data[i + 9])
        i += 2 + length
    return None


# SOF0-3, 5-7, 9-11, 13-15 (C4 is DHT, C8 reserved, CC DAC)
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
# the segments that may come before the first scan and carry a length: frame headers, DHT, DAC, DQT,
# DNL, DRI, DHP, EXP, APP0-15, COM
_SEGMENTS = _SOF_MARKERS | {0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, *range(0xE0, 0xF0), 0xFE}


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Decode encoded image bytes to RGB, refusing images above ``max_pixels`` before decoding.

    ``draft``: for JPEGs, let libjpeg decode at the smallest power-of-two reduction (1/2, 1/4, 1/8)
    whose shorter side is still >= ``draft`` -- several times cheaper for large photos; the
    following resize then starts from fewer, already-averaged pixels (as OpenCLIP's would after its
    own downscale), so only the low-pass filter differs slightly.

    A three-component 8-bit JPEG decoded at full size goes straight to PIL's libjpeg decoder with the
    arguments ``Image.open`` would give it (the same pixels, tested) without PIL's header parsing in
    Python: a quarter of the decode time of a small image (80 px race JPEGs: 122 -> 89 us)."""
    try:
        frame = jpeg_frame(data)
        if frame is not None:
            width, height, components = frame
            if width * height > max_pixels:
                raise DecodeError("too_many_pixels", f"{width}x{height} > {max_pixels}")
            if components == 3 and width and height and not (draft and min(width, height) >= 2 * draft):
                return Image.frombytes("RGB", (width, height), data, "jpeg", "RGB", "")
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise DecodeError("too_many_pixels", f"{img.width}x{img.height} > {max_pixels}")
        if draft and img.format == "JPEG" and min(img.size) >= 2 * draft:
            scale = min(img.size) / draft
            img.draft("RGB", (math.ceil(img.width / scale), math.ceil(img.height / scale)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        return img.convert("RGB")
    except DecodeError:
        raise
    except Exception as e:  # PIL raises many types for corrupt input
        raise DecodeError("corrupt_image", f"{type(e).__name__}: {e}") from None


def to_normalized_chw(img: Image.Image) -> np.ndarray:
    return normalize_chw(to_uint8_chw(img))


def to_uint8_chw(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalize_chw(arr: np.ndarray) -> np.ndarray:
    """uint8 (..., 3, H, W) -> CLIP-normalized float32."""
    out = arr.astype(np.float32)
    out *= _SCALE[:, None, None]
    out += _OFFSET[:, None, None]
    return out


def normalize_images(images, dtype=None):
    """A uint8 torch batch (B, 3, H, W) -> CLIP-normalized float (on the batch's device), with the
    same float32 arithmetic as :func:`normalize_chw`."""
    import torch

    scale = torch.from_numpy(_SCALE).to(images.device)[:, None, None]
    offset = torch.from_numpy(_OFFSET).to(images.device)[:, None, None]
    out = images.to(torch.float32).mul_(scale).add_(offset)
    return out if dtype is None else out.to(dtype)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=TRAIN_SCALE, ratio=TRAIN_RATIO) -> tuple[int, int, int, int]:
    """Crop box (left, top, w, h) covering a random area fraction and aspect ratio, as
    torchvision's RandomResizedCrop draws it (10 tries, then a center-crop fallback)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(img: Image.Image, size: int, rng: np.random.Generator, normalize: bool = True) -> np.ndarray:
    """Random resized crop; CLIP-normalized float32 CHW, or uint8 CHW with ``normalize=False``."""
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
    img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return to_normalized_chw(img) if normalize else to_uint8_chw(img)


def eval_transform(img: Image.Image, size: int, normalize: bool = True) -> np.ndarray:
    scale = size / min(img.width, img.height)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return to_normalized_chw(img) if normalize else to_uint8_chw(img)
