"""Files and manifest shared by every export format; :func:`verify_export`.

Exports are reproducible: the same weights give the same bytes. Tensors are written in a fixed
(natural) name order, safetensors has no timestamps, the manifest no clock time. ``torch.save`` is
byte-stable for the same tensors when written through a file object (the archive's inner folder
name is then always ``archive`` rather than taken from the file name; zip entries carry a fixed
1980 date and the serialization id is derived from the content).
"""

from __future__ import annotations

import json
import os
import re

import torch

from mtx_dist.export.formats import DTYPE_NAMES, FORMATS  # noqa: F401  (re-exported)
from safetensors.torch import save_file

from mtx_data_pipelines.files import atomic_write_with, sha256_file
from mtx_data_pipelines.transforms import CLIP_MEAN, CLIP_STD
from mtx_dist.errors import UserError
from mtx_dist.models.presets import ModelSpec

ENCODER_FILE = "encoder.safetensors"
ENCODER_PTH = "encoder.pth"
OPENCLIP_FILE = "open_clip_model.safetensors"
OPENCLIP_CONFIG = "open_clip_config.json"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"  # the model card
HF_FILE = "model.safetensors"
HF_FILES = ("config.json", HF_FILE, "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
            "preprocessor_config.json")
MLFLOW_FILES = ("MLmodel", "python_env.yaml", "requirements.txt", "conda.yaml", "input_example.json",
                "serving_input_example.json")  # what mlflow.pyfunc.save_model writes
TIMM_FILES = ("config.json", HF_FILE)  # timm's local-dir layout: the same two names as transformers'
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
assert tuple(DTYPES) == DTYPE_NAMES


class ExportError(UserError, ValueError):
    """An exported encoder that does not match its manifest, or cannot be read or written."""


def natural_key(name: str) -> list:
    """``2.x`` before ``10.x``: blocks in model order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def prepare(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Copies in ``dtype``, each in its own exactly sized CPU storage, in natural name order.

    Own storages matter for ``torch.save``: it writes a view's whole underlying storage and its
    offset, so equal tensors sliced differently (e.g. gathered from TP shards) would differ in bytes.
    """
    return {k: tensors[k].detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)
            for k in sorted(tensors, key=natural_key)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, fmt: str) -> None:
    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": fmt})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600; exports are meant to be shared
    atomic_write_with(path, write)


def write_torch(tensors: dict[str, torch.Tensor], path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: see the module docstring (byte stability)
            torch.save(dict(tensors), f)
    atomic_write_with(path, write)


def write_json(obj: dict, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write_with(path, write)


def write_text(text: str, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write_with(path, write)


def encoder_section(spec: ModelSpec) -> dict:
    v = spec.vision
    # norm_eps: our blocks use nn.LayerNorm's default 1e-5, as do timm's Block(norm_layer=nn.LayerNorm)
    # and OpenCLIP's LayerNorm.
    return {"width": v.width, "depth": v.layers, "heads": v.heads, "mlp_ratio": v.mlp_ratio,
            "qkv_bias": True, "act": "gelu", "norm": "layernorm", "norm_eps": 1e-5,
            "patch_size": v.patch_size, "image_size": v.image_size, "embed_dim": spec.embed_dim}


def manifest(formats: list[str], spec: ModelSpec, preset: str, source: dict, dtype: torch.dtype,
             out_dir: str, files: dict[str, int], extra: dict | None = None) -> dict:
    """The manifest of an export whose ``files`` (name -> tensor count, None for non-tensor files)
    are already written into ``out_dir``."""
    v, t = spec.vision, spec.text
    doc = {
        # "metatransformer-blocks" is what the first exports said; kept for readers that check it
        "format": "metatransformer-blocks" if "metatransformer" in formats else formats[0],
        "formats": list(formats),
        "preset": preset,
        "encoder": encoder_section(spec),
        "text": {"width": t.width, "depth": t.layers, "heads": t.heads, "mlp_ratio": t.mlp_ratio,
                 "context_length": t.context_length, "vocab_size": t.vocab_size, "pooling": "argmax (end of text)",
                 "causal": True},
        "preprocessing": {"image_size": v.image_size, "resize": "shortest side, bicubic", "crop": "center",
                          "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "color": "RGB"},
        "tokenizer": {"kind": "clip-bpe", "vocab_size": t.vocab_size, "context_length": t.context_length},
        "source": source,
        "dtype": str(dtype).removeprefix("torch."),
        "files": {},
    }
    for name in sorted(files):
        entry = {"sha256": sha256_file(os.path.join(out_dir, name))}
        if files[name] is not None:
            entry["tensors"] = files[name]
        doc["files"][name] = entry
    doc.update(extra or {})
    return doc


def verify_export(out_dir: str, require: str | None = ENCODER_FILE) -> dict:
    """Check an export directory against its manifest; returns the manifest.

    Every file listed must exist with the listed sha256; ``require`` (by default the
    Meta-Transformer blocks, ``encoder.safetensors``; None: no particular file) must be listed; each listed ``.safetensors``
    file must load with safetensors (data only -- never pickle) holding the listed number of
    tensors, and the encoder blocks ``0..depth-1``. Raises :class:`ExportError` naming the file and
    what is wrong.
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
    if not isinstance(files, dict) or not files:
        raise ExportError(f"{path}: not an encoder export manifest (no files)")
    if require is not None and require not in files:
        formats = manifest.get("formats") or [manifest.get("format")]
        raise ExportError(f"{path}: this export ({', '.join(map(str, formats))}) has no {require}; "
                          f"export the checkpoint with --format "
                          f"{'open_clip' if require == OPENCLIP_FILE else 'metatransformer'}")
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
    for name, meta in sorted(files.items()):
        if not name.endswith(".safetensors"):
            continue
        file = os.path.join(out_dir, name)
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise ExportError(f"{file}: not a readable safetensors file: {e}") from e
        expected = meta.get("tensors")
        if expected is not None and len(tensors) != expected:
            raise ExportError(f"{file}: {len(tensors)} tensors where {MANIFEST_FILE} lists {expected}")
        if name == ENCODER_FILE:
            depth = manifest.get("encoder", {}).get("depth")
            found = {int(k.split(".", 1)[0]) for k in tensors if k.split(".", 1)[0].isdigit()}
            if depth is not None and found != set(range(depth)):
                raise ExportError(f"{file}: blocks {sorted(found)} where {MANIFEST_FILE} says depth {depth}")
    return manifest
