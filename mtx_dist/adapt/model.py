"""Adapted model = Data2Seq tokenizer (trained) -> frozen encoder -> task head (trained), and its files.

``adapter.safetensors`` holds only the trained parts (``tokenizer.*``, ``head.*``); ``adapter.json``
says how to rebuild them (modality, tokenizer settings, head, preprocessing statistics, class names)
and which encoder they belong to: the export path and the sha256 of its ``encoder.safetensors``.
Loading refuses an encoder whose sha256 differs: the tokenizer was fitted to that encoder's blocks.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtx_data_pipelines.files import atomic_open, atomic_write_with
from mtx_dist.adapt.encoder import FrozenEncoder
from mtx_dist.adapt.errors import AdaptError, EncoderMismatchError
from mtx_dist.adapt.tokenizers import build_tokenizer

WEIGHTS_FILE = "adapter.safetensors"
SPEC_FILE = "adapter.json"
FORMAT = "mtx-dist-adapter"


class Head(nn.Module):
    """Pool (the [CLS] token, or the mean of the other tokens) -> LayerNorm -> Linear.

    The LayerNorm is the encoder's final norm in effect (the export carries none) and is trained.
    """

    def __init__(self, width: int, outputs: int, pool: str = "cls") -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise AdaptError(f"pool {pool!r}: choose 'cls' or 'mean'")
        self.pool = pool
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.fc(self.norm(pooled))


class AdaptedModel(nn.Module):
    def __init__(self, tokenizer: nn.Module, encoder: FrozenEncoder, head: Head) -> None:
        super().__init__()
        self.tokenizer, self.encoder, self.head = tokenizer, encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.tokenizer(x)))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.startswith("encoder.")}


def build_model(spec: dict, encoder: FrozenEncoder) -> AdaptedModel:
    head = spec["head"]
    return AdaptedModel(build_tokenizer(spec["modality"], encoder.width, spec["tokenizer"]), encoder,
                        Head(encoder.width, int(head["outputs"]), head["pool"]))


def save_adapter(model: AdaptedModel, spec: dict, out_dir: str) -> str:
    """Write adapter.safetensors + adapter.json (atomically renamed into place); returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    atomic_write_with(weights, lambda tmp: save_file(model.trainable_state(), tmp, metadata={"format": FORMAT}))
    with atomic_open(os.path.join(out_dir, SPEC_FILE)) as f:
        json.dump({"format": FORMAT, "version": 1, **spec}, f, indent=2, sort_keys=True)
    return out_dir


def read_spec(model_dir: str) -> dict:
    path = os.path.join(model_dir, SPEC_FILE)
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise AdaptError(f"{path}: cannot read the adapted model's description: {e}") from e
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise AdaptError(f"{path}: not an mtx-dist adapted model (format {spec.get('format')!r})")
    return spec


def load_adapter(model_dir: str, encoder_dir: str | None = None, attn_backend: str = "auto",
                 device: str = "cpu") -> tuple[AdaptedModel, dict]:
    """Rebuild a saved adapted model on its encoder (``encoder_dir`` overrides the recorded path,
    e.g. after moving the export). Raises :class:`EncoderMismatchError` if the encoder's sha256
    differs from the one it was trained on."""
    spec = read_spec(model_dir)
    recorded = spec["encoder"]
    encoder = FrozenEncoder(encoder_dir or recorded["path"], attn_backend)
    if encoder.sha256 != recorded["sha256"]:
        raise EncoderMismatchError(
            f"{encoder.export_dir}: encoder sha256 {encoder.sha256} differs from {recorded['sha256']}, the "
            f"encoder {model_dir} was trained on; use that encoder export (or retrain the adapter)")
    model = build_model(spec, encoder)
    state = load_file(os.path.join(model_dir, WEIGHTS_FILE))
    expected = model.trainable_state()
    if set(state) != set(expected):
        raise AdaptError(f"{model_dir}/{WEIGHTS_FILE}: tensors {sorted(set(state) ^ set(expected))[:4]} do not "
                         f"match the model described in {SPEC_FILE}")
    model.load_state_dict(state, strict=False)  # the encoder's tensors come from the export, not from here
    model.to(device).eval()
    return model, spec
