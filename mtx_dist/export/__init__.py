"""Export the frozen encoder (Meta-Transformer blocks, OpenCLIP, transformers, timm) with a model card and a manifest.

``manifest.json`` records geometry, preprocessing, tokenizer, provenance, dtype and the sha256 and
tensor count of every file. :func:`verify_export` checks a copy against it (hashes, then a
safetensors load -- never pickle) before anyone builds on it. Formats: :mod:`mtx_dist.export.writers`;
reading a checkpoint or run directory: :mod:`mtx_dist.export.source`.
"""

from mtx_dist.export.common import (
    DTYPES,
    ENCODER_FILE,
    ENCODER_PTH,
    FORMATS,
    MANIFEST_FILE,
    OPENCLIP_CONFIG,
    OPENCLIP_FILE,
    ExportError,
    sha256_file,
    verify_export,
)
from mtx_dist.export.writers import BLOCK_PREFIX, encoder_blocks, export_encoder, openclip_arch, write_export

__all__ = ["BLOCK_PREFIX", "DTYPES", "ENCODER_FILE", "ENCODER_PTH", "FORMATS", "MANIFEST_FILE", "OPENCLIP_CONFIG",
           "OPENCLIP_FILE", "ExportError", "encoder_blocks", "export_encoder", "openclip_arch", "sha256_file",
           "verify_export", "write_export"]
