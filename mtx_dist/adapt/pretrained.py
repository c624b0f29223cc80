"""Tokenizers that start from the pretraining's own input layers.

The blocks of a frozen encoder were trained on the tokens of one stem: the image tower's patch
embedding, class token, positions and ``ln_pre`` (and, for text, the text tower's token embedding). An
adapter whose tokenizer starts random feeds them tokens unlike any they saw, and must learn to
imitate that stem from a few hundred samples. ``mtx-dist train``'s export writes the whole OpenCLIP
model (``open_clip_model.safetensors``) beside the blocks, so the stems are there to start from:

- ``image``: the patch embedding, class token, positions (resampled to the adapter's grid, as the
  vision tower resamples them) and ``ln_pre`` as they are;
- ``xray``, ``infrared``: the same for a grey image read as three equal channels: the patch
  embedding summed over its colours, with the pretraining's per-channel normalisation and the
  adapter's grey one folded into its weight and bias (the same tokens, to float rounding);
- ``video``: the patch embedding inflated over the tubelet (I3D: divided by its length, so a still
  clip gives the image's tokens), the positions repeated for every tubelet slot;
- ``text``: the token embedding (see :mod:`mtx_dist.adapt.text`).

``--tokenizer-init auto`` (default) starts from them when the encoder folder has them and the geometry
allows (the patch size of the export), ``pretrained`` requires them, ``random`` never uses them.
Everything stays trainable; ``adapter.json`` records ``init``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mtx_dist.adapt.errors import AdaptError
from mtx_dist.export import OPENCLIP_FILE
from mtx_dist.models.towers import resample_positions

TOKEN_EMBEDDING = "token_embedding.weight"  # OpenCLIP's names, as our open_clip export writes them
STEM = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
        "visual.ln_pre.bias")
VISION_STEM, TEXT_TOWER = "vision_stem", "text_tower"


def source(encoder_dir: str, mode: str, needs: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    """Shapes of the tensors ``needs`` in the encoder folder's OpenCLIP weights, if they are to be used
    (``mode``: auto, pretrained or random); None when not."""
    if mode == "random":
        return None
    path = os.path.join(encoder_dir, OPENCLIP_FILE)
    if not os.path.exists(path):
        if mode == "pretrained":
            raise AdaptError(f"{encoder_dir}: --tokenizer-init pretrained needs the pretraining's weights "
                             f"({OPENCLIP_FILE}, written by an export with the open_clip format); this folder has none")
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        missing = [n for n in needs if n not in f.keys()]
        if missing:
            raise AdaptError(f"{path}: no {', '.join(missing)} tensor (not an OpenCLIP model file)")
        return {n: tuple(f.get_slice(n).get_shape()) for n in needs}


def load(encoder_dir: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(os.path.join(encoder_dir, OPENCLIP_FILE), framework="pt") as f:
        return {n: f.get_tensor(n).float() for n in names}


def vision_stem_settings(cfg, patch: int, width: int | None = None) -> dict:
    """``{"init": "vision_stem"}`` when the image-like tokenizer of ``cfg`` starts from the export's
    stem, else ``{}``; refuses ``--tokenizer-init pretrained`` where the geometry does not allow it."""
    shapes = source(cfg.encoder, cfg.tokenizer_init, STEM)
    if shapes is None:
        return {}
    pretrained_patch = shapes[STEM[0]][-1]
    if pretrained_patch != patch:
        if cfg.tokenizer_init == "pretrained":
            raise AdaptError(f"--tokenizer-init pretrained: --patch {patch} differs from the pretrained patch "
                             f"embedding's {pretrained_patch}")
        return {}
    return {"init": VISION_STEM}


def init_vision_stem(tokenizer: nn.Module, encoder_dir: str, settings: dict, pre: dict, manifest: dict) -> None:
    """Copy the export's image stem into an image (2-D, 1 or 3 channels) or video (3-D) tokenizer with
    ``patch_embed``/``embed``, ``cls_token``, ``pos_embed`` and ``norm``. ``pre``: the adapter's input
    normalisation; ``manifest``: the export's (its pixel normalisation, the one the stem was trained on)."""
    if settings.get("init") != VISION_STEM:
        return
    stem = load(encoder_dir, STEM)  # one read of the file
    conv, cls, pos, ln_w, ln_b = (stem[n] for n in STEM)
    embed = tokenizer.patch_embed if hasattr(tokenizer, "patch_embed") else tokenizer.embed
    weight = embed.weight
    bias = torch.zeros(weight.shape[0])  # the pretrained patch embedding has none
    if weight.shape[1] == 1:
        # A grey pixel g is g in each of the three channels, which the pretraining normalised per channel
        # ((g - m_c) / s_c); the adapter normalises it with the training pixels' (g - mu) / sigma = z. So
        # the stem on z is sum_c W_c (sigma z + mu - m_c) / s_c: a weight and a bias, exactly.
        trained = manifest.get("preprocessing", {})
        m = torch.tensor(trained.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float64).view(1, 3, 1, 1)
        s = torch.tensor(trained.get("std", (0.5, 0.5, 0.5)), dtype=torch.float64).view(1, 3, 1, 1)
        w64 = conv.double() / s
        bias = (w64 * (float(pre["mean"]) - m)).sum((1, 2, 3)).float()
        conv = (w64.sum(1, keepdim=True) * float(pre["std"])).float()
    if weight.dim() == 5:  # video: inflated over the tubelet
        conv = conv.unsqueeze(2).expand(-1, -1, weight.shape[2], -1, -1) / weight.shape[2]
    with torch.no_grad():
        weight.copy_(conv)
        if embed.bias is not None:
            embed.bias.copy_(bias)
        tokenizer.cls_token.copy_(cls)
        grid = round((tokenizer.pos_embed.shape[0] - 1) ** 0.5) if weight.dim() == 4 else None
        if grid is not None:
            tokenizer.pos_embed.copy_(resample_positions(pos, grid))
        else:  # video: one spatial grid per tubelet slot
            slots, side = tokenizer.shape[1] // weight.shape[2], tokenizer.shape[2] // weight.shape[-1]
            spatial = resample_positions(pos, side)
            tokenizer.pos_embed.copy_(torch.cat([spatial[:1], spatial[1:].repeat(slots, 1)]))
        tokenizer.norm.weight.copy_(ln_w)
        tokenizer.norm.bias.copy_(ln_b)


def text_tower_settings(cfg, vocab: int) -> dict:
    """``{"vocab_size", "text_width", "init": "text_tower"}`` when the text tokenizer starts from the
    export's token embedding, else ``{}``."""
    shapes = source(cfg.encoder, cfg.tokenizer_init, (TOKEN_EMBEDDING,))
    if shapes is None:
        return {}
    shape = shapes[TOKEN_EMBEDDING]
    if len(shape) != 2 or shape[0] < vocab:
        raise AdaptError(f"{cfg.encoder}/{OPENCLIP_FILE}: {TOKEN_EMBEDDING} has shape {shape}, expected (>= {vocab} "
                         "CLIP BPE tokens, width)")
    return {"vocab_size": shape[0], "text_width": shape[1], "init": TEXT_TOWER}


def init_text_tower(tokenizer: nn.Module, encoder_dir: str, settings: dict, pre: dict, manifest: dict) -> None:
    if settings.get("init") == TEXT_TOWER:
        with torch.no_grad():
            tokenizer.embed.weight.copy_(load(encoder_dir, (TOKEN_EMBEDDING,))[TOKEN_EMBEDDING])
