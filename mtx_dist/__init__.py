"""mtx-dist: distributed contrastive pretraining of the Meta-Transformer shared encoder."""

import importlib.util
import os
import sys

# The leaf folders of the tree and the names they install under (pyproject.toml's package-dir):
# `kernels` is also Hugging Face's kernel-hub package, so ours never imports as `kernels`.
LEAF_PACKAGES = {"mtx_kernels": "kernels", "mtx_launchers": "launchers", "mtx_data_pipelines": "data_pipelines"}


class _SourceTreeFinder:
    """Imports the leaf packages from a checkout that was never installed (e.g. a GPU machine
    running ``bash bench/gpu_suite.sh`` with ``PYTHONPATH=.``). An install maps the names itself
    (setuptools' package-dir), and then this finder is never consulted."""

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        top, _, rest = fullname.partition(".")
        if top not in LEAF_PACKAGES or rest:  # subpackages resolve through the package's __path__
            return None
        folder = os.path.join(cls.root, LEAF_PACKAGES[top])
        init = os.path.join(folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[folder])


if any(importlib.util.find_spec(name) is None for name in LEAF_PACKAGES):
    sys.meta_path.append(_SourceTreeFinder)


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mtx-dist")
    except PackageNotFoundError:
        return "unknown"
