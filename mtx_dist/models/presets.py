"""Model geometry presets.

``vit-b16`` and ``vit-l14`` have OpenCLIP ViT-B-16 / ViT-L-14 geometry (the towers whose visual
blocks Meta-Transformer freezes). ``tiny`` and ``micro`` are CPU-sized for the quickstart and tests.
"""

from __future__ import annotations

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


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
