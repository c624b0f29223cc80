"""Model geometry presets.

``model.preset`` names one of:
- our own: ``tiny`` and ``micro`` (CPU-sized, for the quickstart and tests), ``vit-b16`` and
  ``vit-l14`` (aliases of OpenCLIP's ViT-B-16 / ViT-L-14, the towers whose visual blocks
  Meta-Transformer freezes);
- any OpenCLIP ViT model name (``ViT-B-32``, ``ViT-H-14``, ``ViT-bigG-14``, ...): read from the JSON
  model configs inside the installed open_clip_torch (data, read without importing it), so a new
  OpenCLIP config works without a change here;
- the path of an ``open_clip_config.json`` (what our open_clip exports write).
Geometry our towers do not have (QuickGELU, attentional pooling, no class token, layer scale, a
Hugging Face text tower, ...) is refused with the key that asks for it.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
from dataclasses import dataclass

CLIP_VOCAB_SIZE = 49408  # CLIP BPE: 256 bytes x2 + 48894 merges + <start_of_text>, <end_of_text>


@dataclass(frozen=True)
class VisionSpec:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid ** 2 + 1


@dataclass(frozen=True)
class TextSpec:
    context_length: int
    width: int
    layers: int
    heads: int
    vocab_size: int = CLIP_VOCAB_SIZE
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class ModelSpec:
    embed_dim: int
    vision: VisionSpec
    text: TextSpec


PRESETS: dict[str, ModelSpec] = {
    "micro": ModelSpec(64, VisionSpec(32, 8, 64, 2, 2), TextSpec(16, 64, 2, 2)),
    "tiny": ModelSpec(128, VisionSpec(64, 8, 128, 4, 4), TextSpec(32, 128, 4, 4)),
    "vit-b16": ModelSpec(512, VisionSpec(224, 16, 768, 12, 12), TextSpec(77, 512, 12, 8)),
    "vit-l14": ModelSpec(768, VisionSpec(224, 14, 1024, 24, 16), TextSpec(77, 768, 12, 12)),
}


OPENCLIP_ALIASES = {"vit-b16": "ViT-B-16", "vit-l14": "ViT-L-14"}  # equal geometry (tested)


class GeometryError(KeyError):
    """A preset name or model config that does not give a geometry our towers can build."""

    def __str__(self) -> str:
        return str(self.args[0])


def openclip_config_dir() -> str | None:
    """open_clip_torch's folder of JSON model configs (found without importing the package)."""
    spec = importlib.util.find_spec("open_clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, "model_configs")
        if os.path.isdir(path):
            return path
    return None


def openclip_names() -> list[str]:
    """The OpenCLIP model names whose configs give a geometry we can build."""
    folder = openclip_config_dir()
    names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json")) if folder else []
    out = []
    for name in names:
        try:
            get_preset(name)
            out.append(name)
        except GeometryError:
            pass
    return out


def preset_named(spec: ModelSpec) -> str | None:
    """The first preset name with this geometry: ours, then OpenCLIP's (None: no name has it)."""
    return next((name for name in (*PRESETS, *openclip_names()) if get_preset(name) == spec), None)


def is_config_path(name: str) -> bool:
    """Is this preset the path of a model config file (rather than a name)?"""
    return name.endswith(".json") or os.sep in name


@functools.lru_cache(maxsize=None)
def get_preset(name: str) -> ModelSpec:
    """The geometry ``name`` stands for (see the module docstring); :class:`GeometryError` otherwise."""
    if name in PRESETS:
        return PRESETS[name]
    if is_config_path(name):
        path = name
        if not os.path.isfile(path):
            raise GeometryError(f"model config {path!r} does not exist")
    else:
        folder = openclip_config_dir()
        path = os.path.join(folder, f"{name}.json") if folder else ""
        if not os.path.isfile(path):
            close = difflib.get_close_matches(name, [*PRESETS, *openclip_names()], 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GeometryError(f"unknown model preset {name!r}{hint}: use one of {', '.join(PRESETS)}, an OpenCLIP ViT "
                                "model name (e.g. ViT-B-32, ViT-H-14, ViT-bigG-14; open_clip_torch's "
                                "model_configs) or the path of an open_clip_config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise GeometryError(f"model config {path}: {e}") from None
    return spec_from_openclip(cfg, path)


# OpenCLIP config keys that ask for something our towers do not have, unless they hold the value of
# the architecture we build (a pre-LN ViT with a class token and EOT pooling, GELU, learned positions).
_TOP_DEFAULTS = {"quick_gelu": False, "custom_text": None, "cast_dtype": None}
# Not geometry: the logit scale and bias start values belong to the loss (loss.* keys set ours).
_TOP_IGNORED = {"init_logit_scale", "init_logit_bias"}
_VISION_DEFAULTS = {"ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False, "attn_pooler_queries": None,
                    "attn_pooler_heads": None, "no_ln_pre": False, "pos_embed_type": "learnable",
                    "final_ln_after_pool": False, "pool_type": "tok", "output_tokens": False, "act_kwargs": None,
                    "norm_kwargs": None, "timm_model_name": None, "timm_model_pretrained": False,
                    "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False, "timm_drop": 0.0,
                    "timm_drop_path": None, "block_type": None, "use_rmsnorm": False, "class_token": True}
_TEXT_DEFAULTS = {"ls_init_value": None, "embed_cls": False, "pad_id": 0, "no_causal_mask": False,
                  "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False, "proj_type": "linear",
                  "output_tokens": False, "act_kwargs": None, "norm_kwargs": None, "hf_model_name": None,
                  "hf_tokenizer_name": None, "hf_model_pretrained": True, "hf_proj_type": "mlp",
                  "hf_pooler_type": "mean_pooler", "block_type": None, "use_rmsnorm": False,
                  "vocab_size": CLIP_VOCAB_SIZE}
_VISION_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"}
_TEXT_KEYS = {"context_length", "width", "heads", "layers", "mlp_ratio"}


def _refuse_unsupported(cfg: dict, keys: set[str], defaults: dict, where: str) -> None:
    for key, value in cfg.items():
        if key in keys or (key in defaults and value == defaults[key]):
            continue
        if key == "custom_text":  # CustomTextCLIP names the text modules differently; same geometry
            continue
        what = "is not supported by our towers" if key in defaults else "is not a geometry key we know"
        raise GeometryError(f"model config {where}: {key} = {value!r} {what}")


def spec_from_openclip(cfg: dict, where: str = "model config") -> ModelSpec:
    """Our geometry of an OpenCLIP model config (``model_configs/NAME.json`` / ``open_clip_config.json``)."""
    if "model_cfg" in cfg:  # an open_clip_config.json wraps the model config
        cfg = cfg["model_cfg"]
    vision, text = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    if not vision or not text or "embed_dim" not in cfg:
        raise GeometryError(f"model config {where}: needs embed_dim, vision_cfg and text_cfg")
    _refuse_unsupported({k: v for k, v in cfg.items() if k not in ("embed_dim", "vision_cfg", "text_cfg")},
                        _TOP_IGNORED, _TOP_DEFAULTS, where)
    _refuse_unsupported(vision, _VISION_KEYS, _VISION_DEFAULTS, f"{where} vision_cfg")
    _refuse_unsupported(text, _TEXT_KEYS, _TEXT_DEFAULTS, f"{where} text_cfg")
    if not isinstance(vision.get("layers"), int):  # a list: a ResNet
        raise GeometryError(f"model config {where}: vision_cfg layers = {vision.get('layers')!r}: only ViT image "
                            "towers (an integer depth) are supported")
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise GeometryError(f"model config {where}: vision_cfg image_size = {size!r}: square images only")
        size = size[0]
    if "width" not in vision:
        raise GeometryError(f"model config {where}: vision_cfg has no width")
    width = vision["width"]
    head_width = vision.get("head_width", 64)
    v = VisionSpec(size, vision.get("patch_size", 16), width, vision["layers"], width // head_width,
                   float(vision.get("mlp_ratio", 4.0)))
    t = TextSpec(text.get("context_length", 77), text.get("width", 512), text.get("layers", 12), text.get("heads", 8),
                 mlp_ratio=float(text.get("mlp_ratio", 4.0)))
    spec = ModelSpec(cfg["embed_dim"], v, t)
    problems = check_geometry(spec)
    if problems:
        raise GeometryError(f"model config {where}: {problems[0]}")
    return spec


def check_geometry(spec: ModelSpec) -> list[str]:
    """What makes a geometry unbuildable, as ``key = value: why`` lines, keys as in
    ``model.vision.heads`` (empty: fine)."""
    out = []
    v, t = spec.vision, spec.text
    if v.image_size % v.patch_size:
        out.append(f"vision.image_size = {v.image_size}: not a multiple of vision.patch_size {v.patch_size}")
    for tower, s in (("vision", v), ("text", t)):
        for key in ("width", "layers", "heads", "mlp_ratio"):
            if getattr(s, key) <= 0:
                out.append(f"{tower}.{key} = {getattr(s, key)}: must be positive")
        if s.heads > 0 and s.width % s.heads:
            out.append(f"{tower}.heads = {s.heads}: must divide {tower}.width {s.width}")
    if spec.embed_dim <= 0:
        out.append(f"embed_dim = {spec.embed_dim}: must be positive")
    return out
