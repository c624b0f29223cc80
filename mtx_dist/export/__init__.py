"""Export the frozen encoder (Meta-Transformer blocks, OpenCLIP, transformers, timm) with a model card and a manifest.

``manifest.json`` records geometry, preprocessing, tokenizer, provenance, dtype and the sha256 and
tensor count of every file. :func:`verify_export` checks a copy against it (hashes, then a
safetensors load -- never pickle) before anyone builds on it. Formats: :mod:`mtx_dist.export.writers`;
reading a checkpoint or run directory: :mod:`mtx_dist.export.source`.

The names load on first use (PEP 562), so :mod:`mtx_dist.export.formats` can be read without torch.
"""

from __future__ import annotations

from mtx_dist.lazy import lazy_getattr

_WHERE = {
    **dict.fromkeys(("DTYPES", "ENCODER_FILE", "ENCODER_PTH", "FORMATS", "MANIFEST_FILE", "OPENCLIP_CONFIG",
                     "OPENCLIP_FILE", "ExportError", "sha256_file", "verify_export"), "common"),
    **dict.fromkeys(("BLOCK_PREFIX", "encoder_blocks", "export_encoder", "openclip_arch", "write_export"), "writers"),
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_getattr(__name__, _WHERE)
