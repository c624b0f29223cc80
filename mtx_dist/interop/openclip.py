"""OpenCLIP <-> mtx-dist state dicts (the standard ``open_clip.model.CLIP`` two-tower ViT).

The geometry is the same (conv patch embedding without bias, class token, learned positions, ln_pre,
pre-LN blocks with GELU and LayerNorm eps 1e-5, ln_post on the class token then ``@ proj``; a causal
text transformer with argmax (EOT) pooling after ln_final and a bias-free ``text_projection``), so
the mapping is a pure renaming. The only reshape: our ``logit_scale`` / ``logit_bias`` have shape
(1,) (DeepSpeed cannot broadcast 0-dim parameters), OpenCLIP's are 0-dim. OpenCLIP's ``attn_mask``
is a non-persistent buffer, so it is neither written nor expected.
"""

from __future__ import annotations

import os

import torch

from mtx_dist.errors import UserError
from mtx_dist.models.presets import OPENCLIP_ALIASES, ModelSpec

# (our name, OpenCLIP name) for everything outside the blocks
_TOP = (
    ("visual.patch_embed.weight", "visual.conv1.weight"),
    ("visual.cls_token", "visual.class_embedding"),
    ("visual.pos_embed", "visual.positional_embedding"),
    ("visual.ln_pre.weight", "visual.ln_pre.weight"),
    ("visual.ln_pre.bias", "visual.ln_pre.bias"),
    ("visual.ln_post.weight", "visual.ln_post.weight"),
    ("visual.ln_post.bias", "visual.ln_post.bias"),
    ("visual.proj", "visual.proj"),
    ("text.token_embedding.weight", "token_embedding.weight"),
    ("text.pos_embed", "positional_embedding"),
    ("text.ln_final.weight", "ln_final.weight"),
    ("text.ln_final.bias", "ln_final.bias"),
    ("text.proj", "text_projection"),
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
)
# inside one block: timm names -> OpenCLIP ResidualAttentionBlock names
_BLOCK = (
    ("norm1.weight", "ln_1.weight"), ("norm1.bias", "ln_1.bias"),
    ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.weight", "attn.out_proj.weight"), ("attn.proj.bias", "attn.out_proj.bias"),
    ("norm2.weight", "ln_2.weight"), ("norm2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"), ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"), ("mlp.fc2.bias", "mlp.c_proj.bias"),
)

_TOWERS = (("visual.blocks.", "visual.transformer.resblocks."), ("text.blocks.", "transformer.resblocks."))
_SCALARS = ("logit_scale", "logit_bias")
# Entries of some OpenCLIP/OpenAI checkpoints that are derived, not weights.
IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size")
# Built-in OpenCLIP architectures with the geometry of our presets (loadable by name).
OPENCLIP_ARCH = OPENCLIP_ALIASES


class OpenClipImportError(UserError, ValueError):
    """An OpenCLIP checkpoint that cannot be read into a model of the configured geometry."""


def _name_pairs(spec: ModelSpec) -> list[tuple[str, str]]:
    pairs = list(_TOP)
    for (ours, theirs), depth in zip(_TOWERS, (spec.vision.layers, spec.text.layers)):
        pairs += [(f"{ours}{i}.{a}", f"{theirs}{i}.{b}") for i in range(depth) for a, b in _BLOCK]
    return pairs


def to_openclip(state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Our full state dict -> OpenCLIP ``CLIP`` state dict (same tensors, renamed, scalars 0-dim)."""
    out = {}
    for ours, theirs in _name_pairs(spec):
        if ours not in state_dict:
            if ours == "logit_bias":
                continue  # only SigLIP-trained models have one
            raise KeyError(f"state dict has no {ours!r}: not a {spec} contrastive model")
        t = state_dict[ours]
        out[theirs] = t.reshape(()) if ours in _SCALARS else t
    extra = sorted(set(state_dict) - {o for o, _ in _name_pairs(spec)})
    if extra:
        raise KeyError(f"state dict has tensors with no OpenCLIP name: {extra[:8]}")
    return out


def from_openclip(state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """OpenCLIP ``CLIP`` state dict -> ours. Unknown names are kept as they are (so that the strict
    load that follows reports them as unexpected); derived entries (:data:`IGNORED`) are dropped."""
    theirs_to_ours = {t: o for o, t in _name_pairs(spec)}
    out = {}
    for name, t in state_dict.items():
        if name in IGNORED:
            continue
        ours = theirs_to_ours.get(name)
        if ours is None:
            out[name] = t
        else:
            out[ours] = t.reshape(1) if ours in _SCALARS else t
    return out


def model_config(spec: ModelSpec, logit_bias: bool = False) -> dict:
    """OpenCLIP ``model_cfg`` (the JSON of ``open_clip/model_configs``) for this geometry."""
    v, t = spec.vision, spec.text
    cfg = {
        "embed_dim": spec.embed_dim,
        "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                       "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio, "patch_size": v.patch_size},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
        "quick_gelu": False,
    }
    if logit_bias:
        cfg["init_logit_bias"] = 0.0  # creates the parameter; the checkpoint sets its value
    return cfg


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Tensors of an OpenCLIP checkpoint file: ``.safetensors``, or a torch file (``.pt``/``.bin``/
    ``.pth``, loaded as data only) holding the state dict itself or ``{'state_dict': ...}`` with the
    ``module.`` prefixes of a DDP-wrapped training run."""
    if not os.path.isfile(path):
        raise OpenClipImportError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            obj = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise OpenClipImportError(f"{path}: not a readable safetensors file: {e}") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and weights-only errors come in many types
            raise OpenClipImportError(f"{path}: not a torch checkpoint that loads as data only "
                                      f"(weights_only=True): {type(e).__name__}: {str(e)[:300]}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OpenClipImportError(f"{path}: holds no state dict of tensors (a dict name -> tensor, or "
                                  "{'state_dict': ...})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_into(model: torch.nn.Module, path: str, spec: ModelSpec, preset: str) -> None:
    """Load an OpenCLIP checkpoint, or a transformers ``CLIPModel`` folder, into our (unparallelized)
    ``model``; every tensor must match.

    Raises :class:`OpenClipImportError` listing missing, unexpected and wrongly shaped tensors (or, for
    an HF folder, the first geometry difference). A SigLIP model may start from a checkpoint without
    ``logit_bias`` (it keeps its initial value).
    """
    from mtx_dist.interop.hf import HfConversionError, is_hf_folder, read_hf_folder

    if is_hf_folder(path):
        try:
            state = read_hf_folder(path, spec)
        except HfConversionError as e:
            raise OpenClipImportError(f"model.init_from = {path!r} (a transformers folder) does not fit preset "
                                      f"{preset!r}: {e}") from None
    else:
        state = from_openclip(read_checkpoint(path), spec)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k != "logit_bias"]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{title} ({len(items)}): {', '.join(items[:10])}{more}")
        hint = ""
        if "logit_bias" in unexpected:
            hint = "; the checkpoint has a logit_bias (SigLIP): set loss.kind=siglip"
        raise OpenClipImportError(f"model.init_from = {path!r} does not fit preset {preset!r} "
                                  f"(geometry must match): " + "; ".join(parts) + hint)
    with torch.no_grad():
        for k, t in expected.items():
            if k in state:
                t.copy_(state[k])
