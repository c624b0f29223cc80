"""Writing WebDataset shards (``KEY.jpg`` + ``KEY.txt`` [+ ``KEY.cls``] + ``KEY.json``) from a folder of
captioned images or a CSV/TSV/parquet table, and indexing existing tars; every image is decoded
before it is written, every rejection is counted by reason, and each shard gets a DALI index.

The command-line front end is ``mtx-dist shards``; see docs/DATA.md. Names are loaded on first use
so that importing the error type (as the CLI does) stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MANIFEST": "run", "REJECTED_LOG": "run", "WriterOptions": "run", "index_existing": "run",
    "write_shards": "run", "ImageOptions": "samples", "brace_spec": "sink", "ShardWriterError": "errors",
    "detect_kind": "sources",
}
__all__ = ["MANIFEST", "REJECTED_LOG", "ImageOptions", "ShardWriterError", "WriterOptions", "brace_spec",
           "detect_kind", "index_existing", "write_shards"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
