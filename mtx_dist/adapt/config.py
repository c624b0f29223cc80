"""Settings of one adaptation run: a typed section of the config system (``mtx_dist.config``'s
options: the same types, choices, bounds, error messages and ``--help-config``), one
``mtx-dist adapt train`` option per key. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from mtx_dist.adapt.errors import AdaptError
from mtx_dist.config import check_section, option
from mtx_dist.devices import DEVICES
from mtx_kernels import BACKENDS

MODALITIES = ("timeseries", "tabular", "audio", "pointcloud", "image", "xray", "infrared", "hyperspectral", "imu",
              "video", "text", "graph")
TASKS = ("classification", "regression")
REQUIRED = ("encoder", "modality", "data", "out")


@dataclass
class AdaptConfig:
    """Settings of one adaptation run (the ``mtx-dist adapt train`` options, one per field)."""
    encoder: str = option("", "exported encoder folder (encoder.safetensors + manifest.json)")
    modality: str = option("", "input modality", MODALITIES)
    data: str = option("", "training data: a .csv/.parquet file (tabular, timeseries) or a folder")
    out: str = option("", "folder for adapter.safetensors + adapter.json")
    target: str = option("label", "target column (tables, or labels.csv in a folder)")
    task: str = option("classification", "classification (cross-entropy) or regression (MSE)", TASKS)
    epochs: int = option(20, "passes over the training split", min=1)
    patience: int = option(0, "early stopping: stop after this many epochs without a better validation metric "
                           "(0 = run every epoch); the best epoch is the one saved either way", min=0)
    lr: float = option(1e-3, "AdamW learning rate (constant), > 0", min=0)
    weight_decay: float = option(0.01, "AdamW weight decay", min=0)
    batch_size: int = option(32, "samples per step", min=1)
    val_fraction: float = option(0.2, "fraction held out for validation (0 = none), below 1", min=0)
    seed: int = option(0, "seed for initialisation, the split and shuffling", min=0)
    pool: str = option("cls", "head input: the [CLS] token (cls) or the mean of the other tokens (mean)",
                       ("cls", "mean"))
    patch: int = option(0, "patch size: time steps (timeseries, default 16), mel x frame square (audio, "
                         "default 16), pixels (image, xray, infrared; default: the encoder's; hyperspectral: the "
                         "largest of 4, 3, 2, 1 dividing the cube); 0 = default", min=0)
    ignore: str = option("", "tabular: comma-separated columns to leave out (ids)")
    categorical: str = option("", "tabular: comma-separated columns to treat as categories even if numeric")
    sample_rate: int = option(0, "audio: required sample rate in Hz, 0 = that of the first file; imu: the recordings' "
                              "rate, recorded with the model", min=0)
    clip_samples: int = option(0, "audio: samples per clip (pad/crop); 0 = the longest training clip", min=0)
    n_fft: int = option(400, "audio: STFT size (Hann window of the same length)", min=1)
    hop: int = option(160, "audio: STFT hop in samples", min=1)
    n_mels: int = option(128, "audio: mel bands (HTK mel scale)", min=1)
    points: int = option(1024, "point cloud: points per cloud after resampling", min=1)
    groups: int = option(32, "point cloud: FPS centres = tokens", min=1)
    neighbours: int = option(16, "point cloud: kNN points per group", min=1)
    normalize_points: bool = option(True, "point cloud: centre each cloud and scale it into the unit sphere")
    image_size: int = option(0, "image, xray, infrared: side in pixels; 0 = the encoder's image size", min=0)
    band_group: int = option(8, "hyperspectral: adjacent bands in one token", min=1)
    frames: int = option(8, "video: frames sampled evenly from each clip", min=1)
    tubelet: int = option(2, "video: frames in one token (a tubelet of tubelet x patch x patch pixels)", min=1)
    text_column: str = option("text", "text: the column holding the text")
    context_length: int = option(32, "text: CLIP BPE tokens per text (SOT and EOT included; longer texts are cut)",
                                 min=3)
    tokenizer_init: str = option("auto", "text, image, xray, infrared, video: start the tokenizer from the "
                                 "pretraining's own (the text tower's token embedding; the image tower's patch "
                                 "embedding, class token, positions and ln_pre), read from open_clip_model."
                                 "safetensors in the encoder folder: auto = when it is there and the patch size "
                                 "matches, pretrained = required, random = never", ("auto", "pretrained", "random"))
    graph_eigvecs: int = option(8, "graph: Laplacian eigenvectors per node identifier (TokenGT)", min=1)
    cache_gib: float = option(2.0, "folders: decoded samples and model inputs kept in memory up to this many GiB; "
                              "beyond it, batches are decoded from the files each time (memory of a batch)", min=0)
    skip_bad: bool = option(False, "folders: leave out (and count) files that cannot be read, instead of stopping")
    attention: str = option("auto", "attention backend for the frozen blocks", BACKENDS)
    device: str = option("auto", "where to train: auto = cuda when available, else cpu", DEVICES)

    def validate(self) -> AdaptConfig:
        for name in REQUIRED:
            if not getattr(self, name):
                raise AdaptError(f"{name} is required")
        check_section(self, "adapt", AdaptError)
        if self.lr <= 0:
            raise AdaptError(f"config key 'adapt.lr' = {self.lr!r}: must be > 0")
        if self.val_fraction >= 1:
            raise AdaptError(f"config key 'adapt.val_fraction' = {self.val_fraction!r}: must be < 1")
        return self
