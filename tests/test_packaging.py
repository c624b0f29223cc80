"""How the tree installs: our import names beside Hugging Face's `kernels`, the package list, the
leaves' imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib

from mtx_dist import LEAF_PACKAGES
from tests.helpers import DIST_VARS, REPO


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _package_folders() -> dict[str, str]:
    """Import name -> folder of every package in the tree (a folder with an __init__.py)."""
    tops = {"mtx_dist": "mtx_dist", **LEAF_PACKAGES}
    out = {}
    for name, top in tops.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, os.path.join(REPO, top))
                out[name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}"] = dirpath
    return out


def test_pyproject_installs_every_package_folder_under_our_names():
    setuptools = _pyproject()["tool"]["setuptools"]
    assert sorted(setuptools["packages"]) == sorted(_package_folders())
    assert setuptools["package-dir"] == LEAF_PACKAGES


def test_leaf_packages_never_import_the_engine():
    """DESIGN.md: kernels/, launchers/ and data_pipelines/ are leaves; they may not import mtx_dist."""
    offenders = []
    for folder in LEAF_PACKAGES.values():
        for dirpath, _, filenames in os.walk(os.path.join(REPO, folder)):
            for fn in filenames:
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                             else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                    offenders += [f"{os.path.relpath(path, REPO)}: {n}" for n in names if n.split(".")[0] == "mtx_dist"]
    assert not offenders


COEXIST = r"""
import sys
import kernels  # Hugging Face's kernel hub, imported first as a transformers user would
hf = kernels.__file__
from mtx_dist.cli import main
rc = main(sys.argv[1:])
import mtx_kernels
assert rc == 0, rc
assert sys.modules["kernels"].__file__ == hf and hasattr(kernels, "get_kernel"), sys.modules["kernels"]
assert "mtx_kernels.dispatch" in sys.modules, "training did not go through our attention dispatch"
print("HF", hf)
print("OURS", mtx_kernels.__file__)
"""


def test_training_runs_beside_hugging_faces_kernels_package(tmp_path):
    """With HF's `kernels` installed in the same environment (a test dependency), `import kernels` is
    HF's and `mtx-dist train` runs with our kernels as `mtx_kernels`. Run from another folder with
    no PYTHONPATH, as an installed user runs it (from the checkout's root, the folder kernels/ itself
    would shadow HF's package: Python puts the current folder first for `python -m`)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and k not in DIST_VARS}  # as run_cli
    args = ["train", "model.preset=micro", "run.steps=2", "optim.warmup_steps=1", "data.batch_size=8",
            "data.workers=0", f"run.dir={tmp_path / 'run'}", "tracking.enabled=false", "run.eval_at_end=false",
            "run.export_at_end=false", "run.device=cpu"]
    r = subprocess.run([sys.executable, "-c", COEXIST, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    files = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("HF ", "OURS ")))
    assert not files["HF"].startswith(REPO)
    assert files["OURS"] != files["HF"] and files["OURS"].endswith(os.path.join("kernels", "__init__.py"))
