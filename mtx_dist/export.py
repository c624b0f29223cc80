"""Export the frozen image encoder for Meta-Transformer-style modality adaptation.

``encoder.safetensors`` holds the image tower's transformer blocks as a bare state dict with keys
``0.norm1.weight`` ... ``{depth-1}.mlp.fc2.bias`` -- the layout Meta-Transformer loads with
``strict=True`` into ``nn.Sequential(*[timm Block(...)])``. ``manifest.json`` records geometry,
preprocessing, tokenizer, provenance and the sha256 of every file. :func:`verify_export` checks a copy
against it (hashes, then a safetensors load -- never pickle) before anyone builds on it.
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


class ExportError(ValueError):
    """An exported encoder that does not match its manifest, or cannot be read."""


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


def verify_export(out_dir: str) -> dict:
    """Check an export directory against its manifest; returns the manifest.

    Every file listed must exist with the listed sha256, and ``encoder.safetensors`` must load with
    safetensors (data only) holding the listed number of tensors, blocks ``0..depth-1``. Raises
    :class:`ExportError` naming the file and what is wrong.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(out_dir, MANIFEST_FILE)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read the export manifest: {e}") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or ENCODER_FILE not in files:
        raise ExportError(f"{path}: not an encoder export manifest (no files.{ENCODER_FILE})")
    for name, meta in sorted(files.items()):
        file = os.path.join(out_dir, name)
        if os.path.isabs(name) or os.path.normpath(name).startswith(".."):
            raise ExportError(f"{path}: names a file outside the export: {name!r}")
        if not os.path.isfile(file):
            raise ExportError(f"{file}: missing (listed in {MANIFEST_FILE})")
        actual = sha256_file(file)
        if actual != meta.get("sha256"):
            raise ExportError(f"{file}: sha256 {actual} does not match {meta.get('sha256')} in {MANIFEST_FILE} "
                              f"(the file or the manifest was altered, or the copy is incomplete)")
    encoder = os.path.join(out_dir, ENCODER_FILE)
    try:
        blocks = load_file(encoder)
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{encoder}: not a readable safetensors file: {e}") from e
    expected = files[ENCODER_FILE].get("tensors")
    if expected is not None and len(blocks) != expected:
        raise ExportError(f"{encoder}: {len(blocks)} tensors where {MANIFEST_FILE} lists {expected}")
    depth = manifest.get("encoder", {}).get("depth")
    found = {int(k.split(".", 1)[0]) for k in blocks if k.split(".", 1)[0].isdigit()}
    if depth is not None and found != set(range(depth)):
        raise ExportError(f"{encoder}: blocks {sorted(found)} where {MANIFEST_FILE} says depth {depth}")
    return manifest
