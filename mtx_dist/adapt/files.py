"""Folder modalities: audio (.wav), point clouds (.npy) and images (.png/.jpg/.npy).

Labels come from ``labels.csv`` in the folder (a ``file`` column with paths relative to the folder,
plus the target column), or else from class sub-folders (``<folder>/<class>/<sample>``). Files of
other types are left out and counted. A file that cannot be used stops reading with a
:class:`DataError` naming it, or, with ``skip_bad``, is left out and counted (``bad_files_skipped``).
Steps as in ``data.py``: read, fit (training split), transform.
"""

from __future__ import annotations

import logging
import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from mtx_dist.adapt.audio import fit_clip, fixed_length, log_mel, mel_filterbank, read_wav
from mtx_dist.adapt.data import DataError, FileItems, Moments, Raw, is_missing, nbytes, read_table
from mtx_dist.adapt.pointcloud import normalize_cloud, resample_cloud
from mtx_dist.adapt.pretrained import init_vision_stem, vision_stem_settings

LABELS_FILE = "labels.csv"
log = logging.getLogger(__name__)


def list_samples(path: str, suffixes: tuple[str, ...], target: str, labelled: bool) -> Raw:
    """-> Raw with ``items`` = file paths and ``targets`` = labels (None when the folder has none)."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a folder (this modality reads a folder of {'/'.join(suffixes)} files)")
    labels = os.path.join(path, LABELS_FILE)
    info = {}
    if os.path.isfile(labels):
        columns, rows = read_table(labels)
        if "file" not in columns:
            raise DataError(f"{labels}: needs a 'file' column (paths relative to {path}); columns: {columns}")
        has_target = target in columns
        if labelled and not has_target:
            raise DataError(f"{labels}: no column {target!r} (the target); columns are: {', '.join(columns)}")
        if labelled:
            info["rows_without_target_skipped"] = sum(is_missing(r[target]) for r in rows)
            rows = [r for r in rows if not is_missing(r[target])]
        files = [os.path.join(path, r["file"]) for r in rows]
        for f in files:
            if not os.path.isfile(f):
                raise DataError(f"{labels}: lists {f}, which does not exist")
        targets = [r[target] for r in rows] if has_target else None
    else:
        files, ignored = [], 0
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for n in sorted(names):
                if n.lower().endswith(suffixes):
                    files.append(os.path.join(root, n))
                else:
                    ignored += 1
        info["other_files_ignored"] = ignored
        classes = [os.path.relpath(f, path).split(os.sep)[0] if os.sep in os.path.relpath(f, path) else None
                   for f in files]
        unlabelled = [f for f, c in zip(files, classes) if c is None]
        if labelled and unlabelled:
            raise DataError(f"{path}: {unlabelled[0]} (and {len(unlabelled) - 1} more) lie outside class "
                            f"sub-folders and there is no {LABELS_FILE}: the labels are unknown")
        targets = None if unlabelled else classes
    if not files:
        raise DataError(f"{path}: no {'/'.join(suffixes)} files")
    return Raw(files, targets, [os.path.relpath(f, path) for f in files], info)


def read_npy(f: str) -> np.ndarray:
    """An ``.npy`` array (data only, no pickles), or a DataError naming the file."""
    try:
        return np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: not a readable .npy array ({e})") from e


def as_float_checked(a: np.ndarray, f: str, what: str) -> np.ndarray:
    """uint8 -> float32 / 255; floats as they are (NaN and infinities refused); other integer types
    refused (``what`` names the values: pixels, frames)."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{f}: {a.dtype} {what}; expected uint8, or floats")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(f"{f}: NaN or infinite values")
    return a


def image_geometry(cfg, manifest) -> tuple[dict, int, int]:
    """(the encoder's normalisation {mean, std}, image size, patch) for the image-like modalities."""
    enc, prep = manifest.get("encoder", {}), manifest.get("preprocessing", {})
    pre = {"mean": list(prep.get("mean", (0.5, 0.5, 0.5))), "std": list(prep.get("std", (0.5, 0.5, 0.5)))}
    return pre, cfg.image_size or int(enc.get("image_size", 224)), cfg.patch or int(enc.get("patch_size", 16))


def load_each(raw: Raw, load, cfg) -> Raw:
    """Check every file of ``raw.items`` (paths) with ``load``; the items become a :class:`FileItems`
    that keeps decoded samples in memory up to ``cfg.cache_gib`` and decodes the rest again from disk
    when used. A file ``load`` rejects with a DataError stops reading, or with ``cfg.skip_bad`` is
    dropped (with its target and id) and counted."""
    budget = int(cfg.cache_gib * 2**30)
    keep, kept, bad, used = [], {}, [], 0
    for k, f in enumerate(raw.items):
        try:
            item = load(f)
        except DataError as e:
            if not cfg.skip_bad:
                raise
            bad.append(str(e))
            continue
        size = nbytes(item)
        if used + size <= budget:
            kept[len(keep)], used = item, used + size
        keep.append(k)
    if not keep:
        raise DataError(f"no usable file among {len(raw.items)}; the first problem: {bad[0]}")
    raw.items, raw.ids = FileItems([raw.items[k] for k in keep], load, kept), [raw.ids[k] for k in keep]
    raw.targets = None if raw.targets is None else [raw.targets[k] for k in keep]
    if len(kept) < len(keep):
        raw.info["files_read_from_disk_each_time"] = len(keep) - len(kept)
    if bad:
        raw.info.update(bad_files_skipped=len(bad), bad_files_first=bad[:3])
        log.warning("left out %d unusable files, e.g. %s", len(bad), bad[0])
    return raw


class AudioIO:
    @staticmethod
    def read(path, cfg, labelled, pre=None) -> Raw:
        raw = list_samples(path, (".wav",), cfg.target, labelled)
        rate = pre["sample_rate"] if pre else (cfg.sample_rate or None)

        def load(f: str) -> np.ndarray:
            nonlocal rate
            w, rate = read_wav(f, rate)  # the first file fixes the rate when none is configured
            return w

        load_each(raw, load, cfg)
        raw.info["sample_rate"] = rate
        return raw

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        rate = raw.info["sample_rate"]
        clip = cfg.clip_samples or fit_clip((raw.items[i] for i in train_idx), cfg.hop)
        fbank = mel_filterbank(rate, cfg.n_fft, cfg.n_mels)
        feats = Moments()  # of the log-mel features, 64 clips at a time
        for k in range(0, len(train_idx), 64):
            waves, _ = fixed_length([raw.items[i] for i in train_idx[k:k + 64]], clip)
            feats.add(log_mel(waves, fbank, cfg.n_fft, cfg.hop).flatten().numpy())
        settings = {"sample_rate": rate, "clip_samples": clip, "n_fft": cfg.n_fft, "hop": cfg.hop,
                    "n_mels": cfg.n_mels, "patch": cfg.patch or 16, "mean": float(feats.mean[0]),
                    "std": max(float(feats.std(ddof=1)[0]), 1e-6)}
        return {"sample_rate": rate, "clip_samples": clip}, settings

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        x, cropped = fixed_length(raw.items, pre["clip_samples"])
        raw.info["clips_cropped"] = cropped
        return x


class PointCloudIO:
    @staticmethod
    def read(path, cfg, labelled, pre=None) -> Raw:
        raw = list_samples(path, (".npy",), cfg.target, labelled)

        def load(f: str) -> np.ndarray:
            try:
                a = np.load(f, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{f}: not a readable .npy array ({e})") from e
            if a.ndim != 2 or a.shape[1] < 3 or not np.issubdtype(a.dtype, np.number):
                raise DataError(f"{f}: shape {a.shape} {a.dtype}; a point cloud is a numeric (N, 3+features) array")
            if not np.isfinite(a).all():
                raise DataError(f"{f}: contains NaN or infinite coordinates")
            return a.astype(np.float32)

        load_each(raw, load, cfg)
        channels = {c.shape[1] for c in raw.items}
        if len(channels) > 1:
            raise DataError(f"{path}: clouds have different numbers of channels per point: {sorted(channels)}")
        return raw

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        n = cfg.points
        pre = {"points": n, "normalize": cfg.normalize_points, "seed": cfg.seed}
        return pre, {"channels": int(raw.items[0].shape[1]), "groups": min(cfg.groups, n),
                     "neighbours": min(cfg.neighbours, n)}

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        out = []
        for cloud, key in zip(raw.items, raw.ids):
            c = normalize_cloud(cloud) if pre["normalize"] else cloud
            # Seeded by the file name, so a file gets the same points wherever it sits in a folder.
            out.append(resample_cloud(c, pre["points"], pre["seed"] ^ zlib.crc32(key.encode())))
        return torch.from_numpy(np.stack(out))


class ImageIO:
    """Images are resized (bicubic, no crop: the aspect ratio is not kept) to the tokenizer's size and
    normalised with the encoder's preprocessing mean/std. ``.npy``: (H, W) or (H, W, 3), uint8 0..255
    or float 0..1."""

    @staticmethod
    def read(path, cfg, labelled, pre=None) -> Raw:
        from PIL import Image

        raw = list_samples(path, (".png", ".jpg", ".jpeg", ".npy"), cfg.target, labelled)

        def load(f: str) -> np.ndarray:
            try:
                if f.lower().endswith(".npy"):
                    a = np.load(f, allow_pickle=False)
                else:
                    with Image.open(f) as im:
                        a = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"{f}: not a readable image ({e})") from e
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            if a.ndim != 3 or a.shape[2] != 3 or not np.issubdtype(a.dtype, np.number):
                raise DataError(f"{f}: shape {a.shape} {a.dtype}; expected numeric (H, W) or (H, W, 3)")
            return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)

        return load_each(raw, load, cfg)

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        pre, size, patch = image_geometry(cfg, manifest)
        return pre, {"image_size": size, "patch": patch, **vision_stem_settings(cfg, patch)}

    initialise = staticmethod(init_vision_stem)  # the pretrained image stem, when fit chose it

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        size = settings["image_size"]
        mean = torch.tensor(pre["mean"]).view(3, 1, 1)
        std = torch.tensor(pre["std"]).view(3, 1, 1)
        out = []
        for a in raw.items:
            x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
            if x.shape[1:] != (size, size):
                x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True,
                                  align_corners=False)[0].clamp(0, 1)
            out.append((x - mean) / std)
        return torch.stack(out)


def read_dicom(f: str) -> np.ndarray:
    """A single-frame greyscale DICOM image as float32 in 0..1: stored values scaled by their bit
    depth (``BitsStored``; signed ones shifted to start at 0), MONOCHROME1 inverted so that bright
    means dense in every file. Read with pydicom (the optional extra ``mtx-dist[dicom]``)."""
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{f}: DICOM files need pydicom: pip install 'mtx-dist[dicom]'") from None
    try:
        ds = pydicom.dcmread(f)
        frames, samples = int(getattr(ds, "NumberOfFrames", 1) or 1), int(getattr(ds, "SamplesPerPixel", 1))
        if frames != 1 or samples != 1:
            raise DataError(f"{f}: DICOM with {frames} frames of {samples} samples per pixel; expected one "
                            "single-channel image")
        photometric = str(ds.PhotometricInterpretation)
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise DataError(f"{f}: DICOM photometric interpretation {photometric}; expected a greyscale image "
                            "(MONOCHROME1 or MONOCHROME2)")
        bits, signed = int(ds.BitsStored), int(getattr(ds, "PixelRepresentation", 0)) == 1
        a = ds.pixel_array
    except DataError:
        raise
    except Exception as e:  # pydicom raises many kinds (InvalidDicomError, missing pixel handlers, tags, ...)
        raise DataError(f"{f}: not a readable DICOM image ({type(e).__name__}: {e})") from e
    a = a.astype(np.float64)
    if signed:  # two's complement
        a += 2 ** (bits - 1)
    a = np.clip(a / (2**bits - 1), 0.0, 1.0).astype(np.float32)
    return 1.0 - a if photometric == "MONOCHROME1" else a


class GrayImageIO:
    """Single-channel images (``xray``, ``infrared``): ``.png``/``.jpg``/``.tif`` in 8 or 16 bits, or
    ``.npy`` (H, W) arrays (uint8, uint16, or float in 0..1), or ``.dcm`` (DICOM, through the optional
    extra ``mtx-dist[dicom]``: :func:`read_dicom`). A colour image is refused, except one
    whose three channels are equal (a grey picture saved as RGB). Intensities are scaled to 0..1 by
    their bit depth, resized (bicubic) to the tokenizer's size and standardised with the training
    pixels' mean and std (saved with the model): a one-channel patch embedding reads them."""

    SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".dcm")

    @staticmethod
    def read(path, cfg, labelled, pre=None) -> Raw:
        from PIL import Image

        raw = list_samples(path, GrayImageIO.SUFFIXES, cfg.target, labelled)

        def load(f: str) -> np.ndarray:
            if f.lower().endswith(".npy"):
                a = read_npy(f)
            elif f.lower().endswith(".dcm"):
                return read_dicom(f)
            else:
                try:
                    with Image.open(f) as im:
                        a = np.asarray(im.convert("L") if im.mode in ("P", "PA", "LA", "1") else im)
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    raise DataError(f"{f}: not a readable image ({e})") from e
            if a.ndim == 3 and a.shape[2] in (3, 4) and np.issubdtype(a.dtype, np.number):
                if a.shape[2] == 4 or not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
                    raise DataError(f"{f}: a colour image (shape {a.shape}); {cfg.modality or 'this model'} reads single-channel "
                                    "images (H, W)")
                a = a[..., 0]
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.number) or min(a.shape) < 1:
                raise DataError(f"{f}: shape {a.shape} {a.dtype}; expected a numeric single-channel (H, W) image")
            if a.dtype in (np.uint16, np.int32) and a.min() >= 0 and a.max() <= 65535:  # 16 bits (PIL: I;16 or I)
                return a.astype(np.float32) / 65535.0
            return as_float_checked(a, f, "pixels")

        return load_each(raw, load, cfg)

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        _, size, patch = image_geometry(cfg, manifest)
        pixels = Moments()
        for i in train_idx:
            pixels.add(raw.items[i].ravel())
        pre = {"mean": float(pixels.mean[0]), "std": float(pixels.std()[0]) or 1.0}
        return pre, {"image_size": size, "patch": patch, "channels": 1, **vision_stem_settings(cfg, patch)}

    initialise = staticmethod(init_vision_stem)  # the pretrained image stem, summed over its colours

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        size = settings["image_size"]
        out = []
        for a in raw.items:
            x = torch.from_numpy(np.ascontiguousarray(a))[None]
            if x.shape[1:] != (size, size):
                x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
            out.append((x - pre["mean"]) / pre["std"])
        return torch.stack(out)


class ImuIO:
    """IMU recordings: a folder of ``.npy`` ``(channels, T)`` arrays, or a table in the timeseries
    layout (``<channel>_t<k>`` columns). Per-channel standardisation and windows of ``--patch`` steps
    over all channels (the timeseries tokenizer); every recording must have the training recordings'
    channels and length (checked at prediction too, naming the file). The sampling rate
    (``--sample-rate``, Hz) is recorded with the model."""

    @staticmethod
    def read(path, cfg, labelled, pre=None) -> Raw:
        from mtx_dist.adapt.data import TimeSeriesIO

        if os.path.isfile(path):
            return TimeSeriesIO.read(path, cfg, labelled, pre)
        raw = list_samples(path, (".npy",), cfg.target, labelled)
        want = (len(pre["channels"]), pre["length"]) if pre else None

        def load(f: str) -> np.ndarray:
            a = read_npy(f)
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.number) or min(a.shape) < 1:
                raise DataError(f"{f}: shape {a.shape} {a.dtype}; expected a numeric (channels, T) recording")
            if want and a.shape != want:
                raise DataError(f"{f}: shape {a.shape}; the model was trained on {want[0]} channels x {want[1]} steps")
            if not np.isfinite(a).all():
                raise DataError(f"{f}: NaN or infinite values")
            return np.ascontiguousarray(a.T.astype(np.float32))  # (T, channels), as tables give it

        raw = load_each(raw, load, cfg)
        if raw.items:  # fit() checks that every recording has this shape
            raw.info.update(channels=[f"c{k}" for k in range(raw.items[0].shape[1])], length=raw.items[0].shape[0])
        return raw

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        from mtx_dist.adapt.data import TimeSeriesIO

        first = raw.items[train_idx[0]].shape
        for i in range(len(raw.items)):  # validation recordings too
            if raw.items[i].shape != first:
                raise DataError(f"{raw.ids[i]}: {raw.items[i].shape[1]} channels x {raw.items[i].shape[0]} steps; the "
                                f"first training recording has {first[1]} x {first[0]}: every recording needs the same")
        pre, settings = TimeSeriesIO.fit(raw, train_idx, cfg, manifest)
        return {**pre, "sample_rate_hz": cfg.sample_rate or None}, settings

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        from mtx_dist.adapt.data import TimeSeriesIO

        return TimeSeriesIO.transform(raw, pre, settings)
