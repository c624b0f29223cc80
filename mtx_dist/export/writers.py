"""Write the export formats from a full (unsharded) state dict.

``metatransformer``: the image tower's blocks alone as a bare state dict, keys ``0.norm1.weight`` ...
``{depth-1}.mlp.fc2.bias`` -- the layout Meta-Transformer loads with ``strict=True`` into
``nn.Sequential(*[timm Block(dim, heads, mlp_ratio=4., qkv_bias=True, norm_layer=nn.LayerNorm,
act_layer=nn.GELU)])`` -- as ``encoder.safetensors`` and ``encoder.pth`` (a plain dict of tensors
for ``torch.load(weights_only=True)``).

``open_clip``: both towers as an OpenCLIP ``CLIP`` state dict in ``open_clip_model.safetensors``,
with ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) beside it, so that
``open_clip.create_model('local-dir:DIR')`` builds and loads it; for the vit-b16/vit-l14 presets
``open_clip.create_model('ViT-B-16' / 'ViT-L-14', pretrained=DIR/open_clip_model.safetensors)`` works
too, and for other geometries ``mtx-<preset>.json`` is a model config for ``open_clip.add_model_config``.

``hf``: a Hugging Face ``transformers`` CLIP folder (``config.json``, ``model.safetensors``, the CLIP
tokenizer's ``vocab.json``/``merges.txt`` and configs, ``preprocessor_config.json``), so that
``CLIPModel.from_pretrained(DIR)``, ``CLIPProcessor.from_pretrained(DIR)`` and
``pipeline("zero-shot-image-classification", model=DIR)`` work offline (mtx_dist.interop.hf).

``timm``: the image tower as a timm ``VisionTransformer`` (``config.json`` + ``model.safetensors``) for
``timm.create_model('local-dir:DIR', pretrained=True)``: our image embeddings as its output, a fresh
head with ``num_classes=K`` (mtx_dist.interop.timm_vit). timm and transformers both read
``config.json``, so ``hf`` and ``timm`` go to separate folders.
"""

from __future__ import annotations

import contextlib
import os

import torch

from mtx_data_pipelines.transforms import CLIP_MEAN, CLIP_STD
from mtx_dist.export.card import model_card
from mtx_dist.export.common import (
    CARD_FILE,
    ENCODER_FILE,
    ENCODER_PTH,
    FORMATS,
    HF_FILE,
    HF_FILES,
    TIMM_FILES,
    MANIFEST_FILE,
    OPENCLIP_CONFIG,
    OPENCLIP_FILE,
    ExportError,
    MLFLOW_FILES,
    manifest,
    prepare,
    write_json,
    write_safetensors,
    write_text,
    write_torch,
)
from mtx_dist.interop.openclip import OPENCLIP_ARCH, model_config, to_openclip
from mtx_dist.models.presets import PRESETS, GeometryError, ModelSpec, get_preset

BLOCK_PREFIX = "visual.blocks."


def encoder_blocks(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's blocks, renamed ``visual.blocks.N.x`` -> ``N.x`` (a pure slice: names match timm)."""
    blocks = {k[len(BLOCK_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BLOCK_PREFIX)}
    if not blocks:
        raise KeyError(f"no '{BLOCK_PREFIX}*' tensors in the state dict: not a mtx-dist contrastive model")
    return blocks


def openclip_arch(preset: str, spec: ModelSpec) -> tuple[str, bool]:
    """The OpenCLIP model name to build this export with, and whether OpenCLIP knows it already: its
    own model names and our aliases of them, when the geometry is theirs; else ``mtx-<name>`` for the
    config we write (a config file's preset is named after the file, or after its folder for an
    ``open_clip_config.json``; a preset changed by custom geometry keys arrives as ``<name>-custom``)."""
    try:
        named = get_preset(preset) == spec
    except GeometryError:
        named = False
    if named and preset in OPENCLIP_ARCH:
        return OPENCLIP_ARCH[preset], True
    if named and preset not in PRESETS and not preset.endswith(".json"):
        return preset, True
    base, custom = (preset[: -len("-custom")], "-custom") if preset.endswith("-custom") else (preset, "")
    stem = base
    if base.endswith(".json"):
        stem = os.path.splitext(os.path.basename(base))[0]
        if stem == "open_clip_config":
            stem = os.path.basename(os.path.dirname(os.path.abspath(base)))
    return f"mtx-{stem}{custom}", False


def _write_metatransformer(state_dict, spec: ModelSpec, preset: str, out_dir: str, dtype: torch.dtype
                           ) -> tuple[dict[str, int | None], dict]:
    blocks = prepare(encoder_blocks(state_dict), dtype)
    write_safetensors(blocks, os.path.join(out_dir, ENCODER_FILE), "metatransformer-blocks")
    write_torch(blocks, os.path.join(out_dir, ENCODER_PTH))
    return {ENCODER_FILE: len(blocks), ENCODER_PTH: len(blocks)}, {}


def _write_openclip(state_dict, spec: ModelSpec, preset: str, out_dir: str, dtype: torch.dtype
                    ) -> tuple[dict[str, int | None], dict]:
    tensors = prepare(to_openclip(state_dict, spec), dtype)
    write_safetensors(tensors, os.path.join(out_dir, OPENCLIP_FILE), "open_clip")
    cfg = model_config(spec, logit_bias="logit_bias" in tensors)
    preprocess = {"size": spec.vision.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    write_json({"model_cfg": cfg, "preprocess_cfg": preprocess}, os.path.join(out_dir, OPENCLIP_CONFIG))
    files: dict[str, int | None] = {OPENCLIP_FILE: len(tensors), OPENCLIP_CONFIG: None}
    arch, builtin = openclip_arch(preset, spec)
    # Load hints name the export folder symbolically: a copied export stays byte-identical.
    weights = f"DIR/{OPENCLIP_FILE}"
    if not builtin:
        write_json(cfg, os.path.join(out_dir, f"{arch}.json"))
        files[f"{arch}.json"] = None
        by_name = f"open_clip.add_model_config('DIR'); open_clip.create_model('{arch}', pretrained='{weights}')"
    elif "logit_bias" in tensors:  # the built-in config has no logit bias
        by_name = f"open_clip.create_model('{arch}', pretrained='{weights}', init_logit_bias=0.0)"
    else:
        by_name = f"open_clip.create_model('{arch}', pretrained='{weights}')"
    info = {"open_clip": {"arch": arch, "model_cfg": cfg, "load": "open_clip.create_model('local-dir:DIR')",
                          "load_by_name": by_name, "DIR": "the folder holding this manifest"}}
    return files, info


def _write_hf(state_dict, spec: ModelSpec, preset: str, out_dir: str, dtype: torch.dtype) -> tuple[dict[str, int | None], dict]:
    from mtx_dist.interop.hf import HfConversionError, hf_config, preprocessor_config, to_hf, tokenizer_files

    try:
        tensors = prepare(to_hf(state_dict, spec), dtype)
    except HfConversionError as e:
        raise ExportError(f"--format hf: {e}") from None
    write_safetensors(tensors, os.path.join(out_dir, HF_FILE), "pt")  # transformers checks format == "pt"
    cfg = hf_config(spec, float(state_dict["logit_scale"].reshape(())))
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_json(cfg, os.path.join(out_dir, "config.json"))
    for name, content in tokenizer_files(spec.text.context_length).items():
        (write_text if isinstance(content, str) else write_json)(content, os.path.join(out_dir, name))
    write_json(preprocessor_config(spec.vision.image_size), os.path.join(out_dir, "preprocessor_config.json"))
    files: dict[str, int | None] = {name: None for name in HF_FILES}
    files[HF_FILE] = len(tensors)
    return files, {"hf": {"load": "transformers.CLIPModel.from_pretrained(DIR); CLIPProcessor.from_pretrained(DIR)",
                          "DIR": "the folder holding this manifest"}}


def _write_timm(state_dict, spec: ModelSpec, preset: str, out_dir: str, dtype: torch.dtype) -> tuple[dict[str, int | None], dict]:
    from mtx_dist.interop.timm_vit import timm_config, to_timm

    tensors = prepare(to_timm(state_dict, spec), dtype)
    write_safetensors(tensors, os.path.join(out_dir, HF_FILE), "pt")
    write_json(timm_config(spec), os.path.join(out_dir, "config.json"))
    return ({"config.json": None, HF_FILE: len(tensors)},
            {"timm": {"load": "timm.create_model('local-dir:DIR', pretrained=True[, num_classes=K])",
                      "DIR": "the folder holding this manifest"}})


def _write_mlflow(state_dict, spec: ModelSpec, preset: str, out_dir: str, dtype: torch.dtype) -> tuple[dict[str, int | None], dict]:
    from mtx_dist.export.pyfunc import write_mlflow_model

    return write_mlflow_model(out_dir), {"mlflow": {
        "load": "mlflow.pyfunc.load_model(DIR or 'models:/NAME/VERSION').predict(DataFrame with image / "
                "image_bytes / text columns[, params={'classes': [...]}])",
        "DIR": "the folder holding this manifest"}}


WRITERS = {"metatransformer": _write_metatransformer, "open_clip": _write_openclip, "hf": _write_hf,
           "timm": _write_timm, "mlflow": _write_mlflow}


def write_export(state_dict: dict[str, torch.Tensor], spec: ModelSpec, preset: str, out_dir: str, source: dict,
                 formats: list[str] | tuple[str, ...] = ("metatransformer",),
                 dtype: torch.dtype = torch.float32) -> str:
    """Write the requested formats and ``manifest.json`` (last) into ``out_dir``; returns the manifest path."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"export format {unknown or formats!r}: choose from {', '.join(FORMATS)}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ExportError(f"export dtype {dtype}: fp32 or bf16")
    if "mlflow" in formats and "open_clip" not in formats:
        formats = [*formats, "open_clip"]  # the pyfunc model loads the folder's open_clip weights
    formats = [f for f in FORMATS if f in formats]  # a fixed order, whatever order they were asked in
    if "hf" in formats and "timm" in formats:
        raise ExportError("export formats hf and timm both need config.json and model.safetensors: export them "
                          "to separate folders")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # A previous export here goes first, manifest before files: an interrupted export then fails
    # verification plainly, and files of a format not asked for this time do not linger.
    for name in [MANIFEST_FILE, CARD_FILE, ENCODER_FILE, ENCODER_PTH, OPENCLIP_FILE, OPENCLIP_CONFIG, *HF_FILES, *TIMM_FILES,
                 *MLFLOW_FILES,
                 *(f for f in sorted(os.listdir(out_dir)) if f.startswith("mtx-") and f.endswith(".json"))]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))
    files: dict[str, int | None] = {}
    extra: dict = {}
    for fmt in formats:  # each writer: (files it wrote -> tensor count or None, manifest section)
        more, info = WRITERS[fmt](state_dict, spec, preset, out_dir, dtype)
        files.update(more)
        extra.update(info)
    write_text(model_card(manifest(formats, spec, preset, source, dtype, out_dir, {}, extra)),
               os.path.join(out_dir, CARD_FILE))
    files[CARD_FILE] = None
    path = os.path.join(out_dir, MANIFEST_FILE)
    write_json(manifest(formats, spec, preset, source, dtype, out_dir, files, extra), path)
    return path


def export_encoder(state_dict: dict[str, torch.Tensor], spec: ModelSpec, preset: str, out_dir: str,
                   source: dict, dtype: torch.dtype = torch.float32) -> str:
    """The Meta-Transformer export (encoder.safetensors, encoder.pth, manifest.json); returns the manifest path."""
    return write_export(state_dict, spec, preset, out_dir, source, ("metatransformer",), dtype)
