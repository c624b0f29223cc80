"""Package names that load their module on first use (PEP 562), so a package whose tables the config
reads imports no torch until one of its torch modules is used. (The leaf package ``kernels`` may not
import ``mtx_dist`` and carries its own four lines of the same.)"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_getattr(package: str, where: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: name -> the submodule (of ``package``) that defines it."""
    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
