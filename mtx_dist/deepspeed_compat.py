"""Every place mtx-dist relies on DeepSpeed internals, in one module.

Each function below depends on something DeepSpeed does not promise as API; ``tests/
test_deepspeed_compat.py`` checks each of those assumptions against the installed DeepSpeed and fails
naming the one that no longer holds. Verified with DeepSpeed ``VERIFIED_WITH``.

1. :func:`skip_shm_op_build` -- ``deepspeed.comm.torch.build_shm_op`` (module attribute, called when a
   CPU process group starts): JIT-compiles a shared-memory all-reduce (~70 s, needs a compiler); gloo
   does that job for us. The module is reached through ``sys.modules``: ``deepspeed.comm`` binds the
   name ``torch`` to torch itself, so ``import deepspeed.comm.torch as m`` gives torch.
2. :func:`skip_single_rank_allreduce` -- ``DeepSpeedEngine.enable_backward_allreduce`` (instance
   attribute read by the engine's backward and gradient-accumulation boundary): off over one
   data-parallel rank with ZeRO-0, where the dense all-reduce only flattens and copies every gradient.
3. :func:`recording_checkpoint_writes` and :func:`deferred_checkpoint_writes` --
   ``engine.checkpoint_engine.save(state_dict, path)`` (every file DeepSpeed writes goes through it, and
   it is the last to see the state dict): shadowed on the instance for the duration of a save, to learn
   this rank's files (which we then fsync), or to take a copy of each state dict and write it later
   (asynchronous checkpoints). With ``direct``, a ``TorchCheckpointEngine``'s write (``torch.save(state_dict,
   path, _use_new_zipfile_serialization=engine.zipfile_serialization)``) goes through
   ``mtx_data_pipelines.files.DirectFile`` instead of a buffered file; other checkpoint engines write
   their own way. ``direct`` is off unless asked for here; ``checkpoint.save`` and the asynchronous
   saver ask for it by default (``checkpoint.direct_io``).
4. :func:`checkpoint_safe_globals` -- the non-tensor classes DeepSpeed pickles into checkpoints,
   allowed when a checkpoint is validated with ``torch.load(weights_only=True)``.
5. :func:`zero_fp32_state_dict` -- ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
   (checkpoint_dir, tag=...)`` reads ``mp_rank_00`` files only: one tensor-parallel rank's files are
   shown to it under that name through a folder of symlinks.
6. :func:`to_universal` -- ``deepspeed.checkpoint.ds_to_universal.main(args)`` (the converter's command
   line as a function: ``input_folder``, ``output_folder``, worker counts, ``keep_temp_folder``,
   ``strict``, ``inject_missing_state``): turns a tag's partitioned ZeRO / bf16 optimizer states into
   DeepSpeed's universal checkpoint, which an engine configured with ``checkpoint.load_universal``
   loads on any data-parallel size.
7. :func:`mlflow_hidden_from_autotuner` -- ``import deepspeed`` imports ``deepspeed.autotuning.autotuner``,
   which imports mlflow when installed (0.8 s of every start-up) for its own experiment logging, which
   mtx-dist never runs; that one import is refused, so the autotuner sees no mlflow. Everyone else's
   ``import mlflow`` is untouched (our tracking imports it when it is on).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import io
import os
import sys
import tempfile

VERIFIED_WITH = "0.19.8"
AUTOTUNER = "deepspeed.autotuning"
SHM_MODULE = "deepspeed.comm.torch"
CHECKPOINT_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),  # ZeRO 1/2 optimizer files
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"),  # ZeRO 3 and bf16 optimizer files
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))  # bf16, TP optimizer files


def skip_shm_op_build() -> None:
    """(1) Never JIT-build DeepSpeed's CPU shared-memory all-reduce op (CPU runs use gloo)."""
    importlib.import_module(SHM_MODULE)
    sys.modules[SHM_MODULE].build_shm_op = lambda: None


class _RefusedTo(importlib.abc.MetaPathFinder):
    """Refuses the import of ``name`` to the modules under ``importer`` (the statement's own frame,
    found past the import machinery's frames); every other import goes on to the next finder."""

    def __init__(self, name: str, importer: str) -> None:
        self.name, self.importer = name, importer

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
        module = frame.f_globals.get("__name__", "") if frame is not None else ""
        if module == self.importer or module.startswith(self.importer + "."):
            raise ImportError(f"{fullname} is not imported for {module} (mtx-dist does not use it)")
        return None


@contextlib.contextmanager
def mlflow_hidden_from_autotuner():
    """(7) Inside the block, DeepSpeed's autotuner cannot import mlflow; nothing else changes."""
    refuse = _RefusedTo("mlflow", AUTOTUNER)
    sys.meta_path.insert(0, refuse)
    try:
        yield
    finally:
        sys.meta_path.remove(refuse)


def skip_single_rank_allreduce(engine) -> None:
    """(2) No dense gradient all-reduce (with its flatten and copy back) in the engine's backward."""
    engine.enable_backward_allreduce = False


def _direct_writer(ce, original):
    """DeepSpeed's torch.save of a checkpoint file, past the page cache (``DirectFile``)."""
    if type(ce).__name__ != "TorchCheckpointEngine" or not hasattr(ce, "zipfile_serialization"):
        return original

    def write(state_dict, path):
        import torch

        from mtx_data_pipelines.files import DirectFile

        with DirectFile(path) as f:
            torch.save(state_dict, f, _use_new_zipfile_serialization=ce.zipfile_serialization)

    return write


@contextlib.contextmanager
def _shadowed_checkpoint_save(engine, save, direct: bool = False):
    """``engine.checkpoint_engine.save(state_dict, path)`` becomes ``save(original, state_dict, path)``
    inside the block (``original`` writes with ``DirectFile`` when ``direct``); yields False (and
    shadows nothing) when the engine has no such hook."""
    ce = getattr(engine, "checkpoint_engine", None)
    original = getattr(ce, "save", None)
    if original is None:
        yield False
        return
    if direct:
        original = _direct_writer(ce, original)

    def shadow(*args, **kwargs):
        state_dict = kwargs.get("state_dict", args[0] if args else None)
        path = kwargs.get("path", args[1] if len(args) > 1 else None)
        return save(original, state_dict, os.fspath(path))

    shadowed = vars(ce).get("save")
    ce.save = shadow
    try:
        yield True
    finally:
        if shadowed is None:
            del ce.save
        else:
            ce.save = shadowed


@contextlib.contextmanager
def recording_checkpoint_writes(engine, direct: bool = False):
    """(3) The paths DeepSpeed writes through its checkpoint engine inside the block: this rank's files
    (``direct``: written past the page cache). Yields None when the engine has no such hook (then every
    file of the directory is fsynced)."""
    written: list[str] = []

    def save(original, state_dict, path):
        result = original(state_dict, path)
        written.append(path)
        return result

    with _shadowed_checkpoint_save(engine, save, direct) as hooked:
        yield written if hooked else None


@contextlib.contextmanager
def deferred_checkpoint_writes(engine, snapshot, direct: bool = False):
    """(3) Nothing is written inside the block: each file DeepSpeed would write is recorded as
    ``(write, snapshot(state_dict, path), path)``, and ``write(copy, path)`` (DeepSpeed's own writer;
    ``direct``: past the page cache) writes it later, e.g. on another thread. Yields that list, or None
    when the engine has no such hook (then saves cannot be deferred)."""
    deferred: list = []

    def save(original, state_dict, path):
        deferred.append((original, snapshot(state_dict, path), path))

    with _shadowed_checkpoint_save(engine, save, direct) as hooked:
        yield deferred if hooked else None


def checkpoint_safe_globals() -> tuple:
    """(4) The only non-tensor classes DeepSpeed pickles into its files (found by loading checkpoints of
    ZeRO 0-3, fp32 and bf16, TP=2 with weights_only=True). Each is rebuilt from numbers; nothing else is
    let in."""
    found = []
    for module, name in CHECKPOINT_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


def to_universal(tag_dir: str, out_dir: str) -> None:
    """(6) DeepSpeed's universal checkpoint of ``tag_dir`` written to ``out_dir``. Our engine records no
    universal-checkpoint metadata, so the converter injects its defaults (right without tensor
    parallelism, which the caller ensures). One process, its output silenced."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(args)


def zero_fp32_state_dict(tag_dir: str, files: list[str], suffix: str) -> dict:
    """(5) The fp32 state dict DeepSpeed's merger builds from one tensor-parallel rank's ZeRO files
    (``files``: names in ``tag_dir`` containing ``suffix``, e.g. ``mp_rank_01``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="mtx-consolidate-") as tmp:
        view = os.path.join(tmp, "tag")
        os.makedirs(view)
        for f in files:
            os.symlink(os.path.abspath(os.path.join(tag_dir, f)), os.path.join(view, f.replace(suffix, "mp_rank_00")))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress for every file
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tag")
