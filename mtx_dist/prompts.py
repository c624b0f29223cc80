"""Zero-shot prompt templates (torch-free: the CLI offers their names before anything heavy loads)."""

from __future__ import annotations

# Zero-shot prompt templates: a class embedding is the renormalized mean of the normalized text
# embeddings of its name in every template (prompt ensembling). "openai" is a short ensemble in the
# spirit of CLIP's ImageNet prompts; "simple" a single prompt.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "openai": (
        "a photo of a {}.",
        "a picture of a {}.",
        "a close-up photo of the {}.",
        "a blurry photo of a {}.",
        "a bright photo of a {}.",
        "a drawing of a {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
        "an image that shows a {}.",
        "a cropped photo of the {}.",
    ),
    "simple": ("a photo of a {}.",),
}
