"""Export format and dtype names (torch-free: the CLI offers them before anything heavy loads)."""

from __future__ import annotations

FORMATS = ("metatransformer", "open_clip", "hf", "timm", "mlflow")  # mlflow: last, and needs open_clip
DTYPE_NAMES = ("fp32", "bf16")
