"""Modality adaptation (Meta-Transformer): a Data2Seq tokenizer for a new modality and a task head,
trained on top of the frozen exported encoder. See docs/ADAPT.md.

Names are imported lazily so that ``mtx_dist.adapt.config`` and ``.errors`` load without torch.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "AdaptConfig": "config", "MODALITIES": "config", "TASKS": "config",
    "AdaptError": "errors", "DataError": "errors", "EncoderMismatchError": "errors", "WavFormatError": "errors",
    "FrozenEncoder": "encoder", "AdaptedModel": "model", "load_adapter": "model", "save_adapter": "model",
    "build_tokenizer": "tokenizers", "predict": "train", "train_adapter": "train",
}
__all__ = ["MODALITIES", "TASKS", "AdaptConfig", "AdaptError", "AdaptedModel", "DataError", "EncoderMismatchError",
           "FrozenEncoder", "WavFormatError", "build_tokenizer", "load_adapter", "predict", "save_adapter",
           "train_adapter"]



def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
