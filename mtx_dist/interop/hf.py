"""Hugging Face ``transformers`` CLIP <-> mtx-dist: state dicts, ``config.json``, tokenizer and
image-processor files, written without importing transformers (an optional extra).

The geometry maps one to one onto ``CLIPModel`` with ``hidden_act="gelu"`` (exact GELU; HF's OpenAI
configs say ``quick_gelu``) and ``eos_token_id=49407``, which makes HF pool the text at the first
end-of-text token, where ours pools. The fused ``qkv`` of a block splits into HF's ``q_proj``,
``k_proj`` and ``v_proj`` (rows in that order, timm's layout); positions become ``nn.Embedding``
weights; the projections are bias-free ``nn.Linear`` weights, i.e. our ``proj`` transposed. A SigLIP
model (``logit_bias``) has no ``CLIPModel`` equivalent and is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields

import torch

from mtx_data_pipelines.tokenizer import ClipTokenizer
from mtx_data_pipelines.transforms import CLIP_MEAN, CLIP_STD
from mtx_dist.errors import UserError
from mtx_dist.models.presets import ModelSpec, TextSpec, VisionSpec

HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default: ours, OpenCLIP's and timm's

# (our name, HF CLIPModel name) outside the blocks; "T" marks a transposed projection
_TOP = (
    ("visual.patch_embed.weight", "vision_model.embeddings.patch_embedding.weight", ""),
    ("visual.cls_token", "vision_model.embeddings.class_embedding", ""),
    ("visual.pos_embed", "vision_model.embeddings.position_embedding.weight", ""),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", ""),  # sic: HF's spelling
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", ""),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight", ""),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", ""),
    ("visual.proj", "visual_projection.weight", "T"),
    ("text.token_embedding.weight", "text_model.embeddings.token_embedding.weight", ""),
    ("text.pos_embed", "text_model.embeddings.position_embedding.weight", ""),
    ("text.ln_final.weight", "text_model.final_layer_norm.weight", ""),
    ("text.ln_final.bias", "text_model.final_layer_norm.bias", ""),
    ("text.proj", "text_projection.weight", "T"),
)
_BLOCK = (
    ("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
    ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
)

_TOWERS = (("visual", "vision_model"), ("text", "text_model"))


class HfConversionError(UserError, ValueError):
    """A model or folder that has no faithful counterpart on the other side; names the difference."""


def _pairs(spec: ModelSpec) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """The one name table, used both ways: (ours, HF) pairs of tensors that map as they are, of
    projections that map transposed, and of fused qkv tensors (ours) to their HF prefix."""
    same = [(ours, hf) for ours, hf, how in _TOP if how != "T"]
    transposed = [(ours, hf) for ours, hf, how in _TOP if how == "T"]
    qkv = []
    for ours, hf in _TOWERS:
        for i in range(spec.vision.layers if ours == "visual" else spec.text.layers):
            src, dst = f"{ours}.blocks.{i}.", f"{hf}.encoder.layers.{i}."
            same += [(src + f"{a}.{p}", dst + f"{b}.{p}") for a, b in _BLOCK for p in ("weight", "bias")]
            qkv += [(src + f"attn.qkv.{p}", dst + f"self_attn.{{}}_proj.{p}") for p in ("weight", "bias")]
    return same, transposed, qkv


def to_hf(state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Our full state dict -> ``CLIPModel``'s (every tensor of it; position ids are HF buffers it makes)."""
    if "logit_bias" in state_dict:
        raise HfConversionError("a SigLIP model (loss.kind = siglip, it has a logit_bias) has no transformers "
                                "CLIPModel equivalent: CLIPModel has no logit bias")
    same, transposed, qkv = _pairs(spec)
    out = {hf: state_dict[ours] for ours, hf in same} | {hf: state_dict[ours].t() for ours, hf in transposed}
    for ours, hf in qkv:
        out.update(zip((hf.format(x) for x in "qkv"), state_dict[ours].chunk(3, dim=0)))
    out["logit_scale"] = state_dict["logit_scale"].reshape(())
    return out


def from_hf(tensors: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """``CLIPModel``'s state dict -> ours (the inverse of :func:`to_hf`; HF's buffers are left out)."""
    same, transposed, qkv = _pairs(spec)
    try:
        out = {ours: tensors[hf] for ours, hf in same} | {ours: tensors[hf].t() for ours, hf in transposed}
        out |= {ours: torch.cat([tensors[hf.format(x)] for x in "qkv"]) for ours, hf in qkv}
        out["logit_scale"] = tensors["logit_scale"].reshape(1)
    except KeyError as e:
        raise HfConversionError(f"not a transformers CLIPModel state dict of this geometry: no tensor {e}") from None
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(spec: ModelSpec, logit_scale: float) -> dict:
    """``config.json`` of a ``CLIPModel`` with our geometry (keys read by transformers 4.x and 5.x)."""
    v, t = spec.vision, spec.text
    tok = ClipTokenizer(context_length=t.context_length)
    text = {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio), "projection_dim": spec.embed_dim,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "hidden_act": "gelu", "layer_norm_eps": LAYER_NORM_EPS, "bos_token_id": tok.sot_id,
            "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}
    vision = {"model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
              "projection_dim": spec.embed_dim, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
              "num_channels": 3, "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "gelu",
              "layer_norm_eps": LAYER_NORM_EPS}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": spec.embed_dim,
            "logit_scale_init_value": logit_scale, "text_config": text, "vision_config": vision,
            "torch_dtype": "float32"}


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    """Our geometry of an HF ``config.json``; refuses what our towers cannot be (naming the key)."""
    if cfg.get("model_type") != "clip":
        raise HfConversionError(f"config.json: model_type {cfg.get('model_type')!r}, not a CLIPModel ('clip')")
    v, t = cfg.get("vision_config", {}), cfg.get("text_config", {})
    for side, c in (("vision_config", v), ("text_config", t)):
        if c.get("hidden_act", "quick_gelu") != "gelu":
            raise HfConversionError(f"config.json: {side}.hidden_act = {c.get('hidden_act', 'quick_gelu')!r}; our "
                                    "towers use exact GELU ('gelu')")
        if abs(c.get("layer_norm_eps", LAYER_NORM_EPS) - LAYER_NORM_EPS) > 1e-12:
            raise HfConversionError(f"config.json: {side}.layer_norm_eps = {c['layer_norm_eps']}; ours is 1e-5")
    try:
        return ModelSpec(int(cfg["projection_dim"]),
                         VisionSpec(v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"],
                                    v["num_attention_heads"], v["intermediate_size"] / v["hidden_size"]),
                         TextSpec(t["max_position_embeddings"], t["hidden_size"], t["num_hidden_layers"],
                                  t["num_attention_heads"], t["vocab_size"], t["intermediate_size"] / t["hidden_size"]))
    except KeyError as e:
        raise HfConversionError(f"config.json: no {e} (transformers writes it; an older or partial config?)") from None


def tokenizer_files(context_length: int) -> dict[str, object]:
    """``vocab.json``, ``merges.txt`` and the tokenizer config of our CLIP BPE tokenizer for HF's
    ``CLIPTokenizer``, derived from the BPE data the project ships (offline). Special tokens carry
    OpenAI's names, the ids are ours."""
    tok = ClipTokenizer(context_length=context_length)
    vocab = dict(tok.encoder)
    for ours, hf in ((tok.decoder[tok.sot_id], HF_SOT), (tok.decoder[tok.eot_id], HF_EOT)):
        vocab[hf] = vocab.pop(ours)
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in sorted(tok.ranks.items(), key=lambda kv: kv[1]))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": HF_SOT,
              "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": HF_EOT, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False}
    special = {"bos_token": HF_SOT, "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": HF_EOT}
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": config,
            "special_tokens_map.json": special}


def preprocessor_config(image_size: int) -> dict:
    """HF ``CLIPImageProcessor`` settings equal to our evaluation transform: shortest side to the image
    size (bicubic), centre crop, CLIP mean/std."""
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor", "do_resize": True,
            "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True}


def is_hf_folder(path: str) -> bool:
    """A folder with a transformers ``config.json`` (what ``model.init_from`` treats as an HF model)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def folder_spec(path: str) -> ModelSpec:
    """The geometry of a transformers ``CLIPModel`` folder, from its ``config.json``."""
    with open(os.path.join(path, "config.json")) as f:
        return spec_from_hf_config(json.load(f))


def read_hf_folder(path: str, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Our state dict from a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors``)
    whose geometry is ``spec``; raises :class:`HfConversionError` naming the first difference."""
    from safetensors.torch import load_file

    theirs = folder_spec(path)
    for side in ("vision", "text"):
        a, b = getattr(theirs, side), getattr(spec, side)
        for field in fields(a):
            if getattr(a, field.name) != getattr(b, field.name):
                raise HfConversionError(f"its {side} {field.name} is {getattr(a, field.name)}, the preset's "
                                        f"{getattr(b, field.name)} (geometry must match)")
    if theirs.embed_dim != spec.embed_dim:
        raise HfConversionError(f"its projection_dim is {theirs.embed_dim}, the preset's embed_dim {spec.embed_dim}")
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise HfConversionError("no model.safetensors in it (save_pretrained(..., safe_serialization=True) writes one)")
    return from_hf(load_file(weights), spec)
