"""Settings of one adaptation run: a small typed dataclass, one ``mtx-dist adapt train`` option per
field (the CLI builds its options from these fields and their help texts). Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtx_dist.adapt.errors import AdaptError

MODALITIES = ("timeseries", "tabular", "audio", "pointcloud", "image")
TASKS = ("classification", "regression")
DEVICES = ("auto", "cpu", "cuda")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class AdaptConfig:
    """Settings of one adaptation run (the ``mtx-dist adapt train`` options, one per field)."""
    encoder: str = _opt("", "exported encoder folder (encoder.safetensors + manifest.json)")
    modality: str = _opt("", f"input modality: {', '.join(MODALITIES)}")
    data: str = _opt("", "training data: a .csv/.parquet file (tabular, timeseries) or a folder")
    out: str = _opt("", "folder for adapter.safetensors + adapter.json")
    target: str = _opt("label", "target column (tables, or labels.csv in a folder)")
    task: str = _opt("classification", "classification (cross-entropy) or regression (MSE)")
    epochs: int = _opt(20, "passes over the training split")
    lr: float = _opt(1e-3, "AdamW learning rate (constant)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    batch_size: int = _opt(32, "samples per step")
    val_fraction: float = _opt(0.2, "fraction held out for validation (0 = none)")
    seed: int = _opt(0, "seed for initialisation, the split and shuffling")
    pool: str = _opt("cls", "head input: the [CLS] token (cls) or the mean of the other tokens (mean)")
    patch: int = _opt(0, "patch size: time steps (timeseries, default 16), mel x frame square (audio, "
                         "default 16), pixels (image, default: the encoder's); 0 = default")
    ignore: str = _opt("", "tabular: comma-separated columns to leave out (ids)")
    categorical: str = _opt("", "tabular: comma-separated columns to treat as categories even if numeric")
    sample_rate: int = _opt(0, "audio: required sample rate in Hz; 0 = that of the first file")
    clip_samples: int = _opt(0, "audio: samples per clip (pad/crop); 0 = the longest training clip")
    n_fft: int = _opt(400, "audio: STFT size (Hann window of the same length)")
    hop: int = _opt(160, "audio: STFT hop in samples")
    n_mels: int = _opt(128, "audio: mel bands (HTK mel scale)")
    points: int = _opt(1024, "point cloud: points per cloud after resampling")
    groups: int = _opt(32, "point cloud: FPS centres = tokens")
    neighbours: int = _opt(16, "point cloud: kNN points per group")
    normalize_points: bool = _opt(True, "point cloud: centre each cloud and scale it into the unit sphere")
    image_size: int = _opt(0, "image: side in pixels; 0 = the encoder's image size")
    skip_bad: bool = _opt(False, "folders: leave out (and count) files that cannot be read, instead of stopping")
    attention: str = _opt("auto", "attention backend for the frozen blocks")
    device: str = _opt("auto", "where to train: auto = cuda when available, else cpu")

    def validate(self) -> AdaptConfig:
        for name in ("encoder", "data", "out"):
            if not getattr(self, name):
                raise AdaptError(f"{name} is required")
        if self.modality not in MODALITIES:
            raise AdaptError(f"unknown modality {self.modality!r}; choose one of {', '.join(MODALITIES)}")
        if self.task not in TASKS:
            raise AdaptError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.pool not in ("cls", "mean"):
            raise AdaptError(f"pool {self.pool!r}: choose 'cls' or 'mean'")
        for name in ("epochs", "batch_size", "n_fft", "hop", "n_mels", "points", "groups", "neighbours"):
            if getattr(self, name) < 1:
                raise AdaptError(f"{name} = {getattr(self, name)}: must be >= 1")
        for name in ("patch", "sample_rate", "clip_samples", "image_size", "seed"):
            if getattr(self, name) < 0:
                raise AdaptError(f"{name} = {getattr(self, name)}: must be >= 0")
        if not 0 <= self.val_fraction < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise AdaptError("need 0 <= val_fraction < 1, lr > 0 and weight_decay >= 0")
        if self.device not in DEVICES:
            raise AdaptError(f"device {self.device!r}: choose one of {', '.join(DEVICES)}")
        from mtx_kernels import BACKENDS
        if self.attention not in BACKENDS:
            raise AdaptError(f"attention {self.attention!r}: choose one of {', '.join(BACKENDS)}")
        return self
