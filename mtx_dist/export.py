"""Export the frozen image encoder for Meta-Transformer-style modality adaptation.

``encoder.safetensors`` holds the image tower's transformer blocks as a bare state dict with keys
``0.norm1.weight`` ... ``{depth-1}.mlp.fc2.bias`` -- the layout Meta-Transformer loads with
``strict=True`` into ``nn.Sequential(*[timm Block(...)])``. ``manifest.json`` records geometry,
preprocessing, tokenizer, provenance and the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import save_file

from data_pipelines.transforms import CLIP_MEAN, CLIP_STD
from mtx_dist.models.presets import ModelSpec

ENCODER_FILE = "encoder.safetensors"
MANIFEST_FILE = "manifest.json"
BLOCK_PREFIX = "visual.blocks."


def encoder_blocks(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's blocks, renamed ``visual.blocks.N.x`` -> ``N.x`` (a pure slice: names match timm)."""
    blocks = {k[len(BLOCK_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BLOCK_PREFIX)}
    if not blocks:
        raise KeyError(f"no '{BLOCK_PREFIX}*' tensors in the state dict: not a mtx-dist contrastive model")
    return blocks


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_encoder(state_dict: dict[str, torch.Tensor], spec: ModelSpec, preset: str, out_dir: str,
                   source: dict, dtype: torch.dtype = torch.float32) -> str:
    """Write encoder.safetensors + manifest.json to ``out_dir``; returns the manifest path."""
    os.makedirs(out_dir, exist_ok=True)
    blocks = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sorted(encoder_blocks(state_dict).items())}
    encoder_path = os.path.join(out_dir, ENCODER_FILE)
    save_file(blocks, encoder_path, metadata={"format": "metatransformer-blocks"})
    v = spec.vision
    manifest = {
        "format": "metatransformer-blocks",
        "preset": preset,
        "encoder": {"width": v.width, "depth": v.layers, "heads": v.heads, "mlp_ratio": v.mlp_ratio,
                    "qkv_bias": True, "act": "gelu", "norm": "layernorm", "norm_eps": 1e-5,
                    "patch_size": v.patch_size, "image_size": v.image_size, "embed_dim": spec.embed_dim},
        "preprocessing": {"image_size": v.image_size, "resize": "shortest side, bicubic", "crop": "center",
                          "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "color": "RGB"},
        "tokenizer": {"kind": "clip-bpe", "vocab_size": spec.text.vocab_size,
                      "context_length": spec.text.context_length},
        "source": source,
        "dtype": str(dtype).removeprefix("torch."),
        "files": {ENCODER_FILE: {"sha256": sha256_file(encoder_path), "tensors": len(blocks)}},
    }
    path = os.path.join(out_dir, MANIFEST_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path
