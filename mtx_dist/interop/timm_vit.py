"""Our image tower as a timm ``VisionTransformer`` (``mtx-dist export --format timm``), written without
importing timm.

timm's CLIP image towers are ``VisionTransformer(pre_norm=True, class_token=True, global_pool="token")``
with LayerNorm eps 1e-5 and exact GELU: the same computation as ours, block names identical. The
differences are shapes and names around the blocks (``cls_token`` (1, 1, w), ``pos_embed`` (1, N, w),
``norm_pre``/``norm`` for ln_pre/ln_post) and the projection, which becomes timm's classifier ``head``:
a ``Linear(width, embed_dim)`` whose weight is ``proj`` transposed and whose bias is zero. So the
model's output is our (unnormalized) image embedding, and ``timm.create_model(..., num_classes=K)``
replaces that head with a fresh one for fine-tuning.
"""

from __future__ import annotations

import torch

from mtx_data_pipelines.transforms import CLIP_MEAN, CLIP_STD
from mtx_dist.models.presets import ModelSpec

# A registered timm name: model_args set every dimension; its own args give LayerNorm eps 1e-5 (a
# "layernorm" string would mean timm's LayerNorm, eps 1e-6) and its default activation is exact GELU.
ARCHITECTURE = "vit_base_patch16_clip_224"


def to_timm(state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    v = spec.vision
    out = {k.removeprefix("visual."): t for k, t in state_dict.items() if k.startswith("visual.blocks.")}
    proj = state_dict["visual.proj"]
    out.update({
        "patch_embed.proj.weight": state_dict["visual.patch_embed.weight"],
        "cls_token": state_dict["visual.cls_token"].reshape(1, 1, v.width),
        "pos_embed": state_dict["visual.pos_embed"].reshape(1, v.grid ** 2 + 1, v.width),
        "norm_pre.weight": state_dict["visual.ln_pre.weight"], "norm_pre.bias": state_dict["visual.ln_pre.bias"],
        "norm.weight": state_dict["visual.ln_post.weight"], "norm.bias": state_dict["visual.ln_post.bias"],
        "head.weight": proj.t(), "head.bias": torch.zeros(proj.shape[1], dtype=proj.dtype),
    })
    return out


def timm_config(spec: ModelSpec) -> dict:
    """``config.json`` for ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    v = spec.vision
    return {
        "architecture": ARCHITECTURE,
        "num_classes": spec.embed_dim,
        "num_features": v.width,
        "model_args": {"img_size": v.image_size, "patch_size": v.patch_size, "embed_dim": v.width, "depth": v.layers,
                       "num_heads": v.heads, "mlp_ratio": v.mlp_ratio, "qkv_bias": True, "pre_norm": True,
                       "class_token": True, "global_pool": "token"},
        "pretrained_cfg": {"input_size": [3, v.image_size, v.image_size], "interpolation": "bicubic",
                           "crop_pct": 1.0, "crop_mode": "center", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                           "num_classes": spec.embed_dim, "first_conv": "patch_embed.proj", "classifier": "head"},
    }
