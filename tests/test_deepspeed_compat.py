"""The DeepSpeed internals mtx_dist/deepspeed_compat.py relies on, checked against the installed
DeepSpeed: each test names the assumption that broke. (Their effects are tested where they matter:
tests/test_speed.py for the skipped all-reduce, tests/faults for checkpoint durability and validation,
tests/test_parallel.py for consolidation.)"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from mtx_dist import deepspeed_compat as compat


@pytest.fixture(scope="module")
def deepspeed():
    from mtx_dist.engine import _import_deepspeed
    return _import_deepspeed(torch.device("cpu"))


def test_shm_op_builder_is_the_module_attribute_that_is_replaced(deepspeed):
    module = sys.modules[compat.SHM_MODULE]
    assert module is not torch, "deepspeed.comm.torch is no longer its own module"
    assert module.build_shm_op.__qualname__.startswith("skip_shm_op_build.")  # ours: builds nothing
    init = inspect.getsource(module)
    assert "build_shm_op()" in init, "deepspeed.comm.torch no longer calls build_shm_op(): the skip is moot"


def test_backward_allreduce_switch_is_read_by_the_engine(deepspeed):
    from deepspeed.runtime.engine import DeepSpeedEngine

    src = inspect.getsource(DeepSpeedEngine)
    assert "self.enable_backward_allreduce = True" in src, "DeepSpeedEngine no longer sets enable_backward_allreduce"
    reads = src.count("if self.enable_backward_allreduce") + src.count("elif self.enable_backward_allreduce")
    assert reads >= 2, "DeepSpeedEngine's backward / accumulation boundary no longer reads enable_backward_allreduce"


def test_checkpoint_engine_save_takes_state_dict_and_path(deepspeed):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    params = list(inspect.signature(TorchCheckpointEngine.save).parameters)
    assert params[:3] == ["self", "state_dict", "path"], f"CheckpointEngine.save({', '.join(params)})"

    calls = []

    class CheckpointEngine:  # DeepSpeed's signature, recording instead of writing
        def save(self, state_dict, path):
            calls.append(path)

    class Engine:
        checkpoint_engine = CheckpointEngine()

    engine = Engine()
    with compat.recording_checkpoint_writes(engine) as written:
        engine.checkpoint_engine.save({}, "/x/a.pt")
        engine.checkpoint_engine.save({}, path="/x/b.pt")
    assert written == ["/x/a.pt", "/x/b.pt"] and calls == ["/x/a.pt", "/x/b.pt"]
    assert "save" not in vars(engine.checkpoint_engine)  # the instance's save is DeepSpeed's again

    calls.clear()
    with compat.deferred_checkpoint_writes(engine, lambda sd, path: {"copy of": sd["w"]}) as deferred:
        engine.checkpoint_engine.save({"w": 1}, "/x/a.pt")
        engine.checkpoint_engine.save(state_dict={"w": 2}, path="/x/b.pt")
    assert calls == []  # nothing written inside the block
    assert [(d[1], d[2]) for d in deferred] == [({"copy of": 1}, "/x/a.pt"), ({"copy of": 2}, "/x/b.pt")]
    deferred[0][0](*deferred[0][1:])  # DeepSpeed's own writer, later
    assert calls == ["/x/a.pt"] and "save" not in vars(engine.checkpoint_engine)


def test_torch_checkpoint_engine_writes_what_the_direct_writer_writes(deepspeed, tmp_path):
    """The direct writer stands in for TorchCheckpointEngine.save: that must still be one torch.save with
    the engine's serialization flag, and the file written in its place must load equal."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    src = inspect.getsource(TorchCheckpointEngine.save)
    code = [line.strip() for line in src.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
    assert code == ["torch.save(state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization)"], src

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine, state = Engine(), {"w": torch.randn(1000, 300), "step": 3}
    engine.checkpoint_engine.zipfile_serialization = True  # as DeepSpeed's config sets it by default
    with compat.recording_checkpoint_writes(engine, direct=True) as written:
        engine.checkpoint_engine.save(state, str(tmp_path / "a.pt"))
    engine.checkpoint_engine.save(state, str(tmp_path / "b.pt"))  # DeepSpeed's own write
    assert written == [str(tmp_path / "a.pt")]
    import zipfile  # torch.save names the zip's folder after a path it writes to, "archive" for a file object
    assert zipfile.ZipFile(tmp_path / "a.pt").namelist()[0].startswith("archive/")  # went through DirectFile
    assert zipfile.ZipFile(tmp_path / "b.pt").namelist()[0].startswith("b/")
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pt", "b.pt"))
    assert torch.equal(a["w"], state["w"]) and torch.equal(b["w"], state["w"]) and a["step"] == b["step"] == 3


def test_checkpoint_globals_exist(deepspeed):
    found = compat.checkpoint_safe_globals()
    assert [f"{c.__module__}.{c.__name__}" for c in found] == [f"{m}.{n}" for m, n in compat.CHECKPOINT_GLOBALS]


def test_zero_to_fp32_entry_point(deepspeed):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    params = inspect.signature(get_fp32_state_dict_from_zero_checkpoint).parameters
    assert list(params)[:2] == ["checkpoint_dir", "tag"]
    src = inspect.getsource(sys.modules["deepspeed.utils.zero_to_fp32"])
    assert "mp_rank_00" in src or "model_states.pt" in src, "zero_to_fp32 no longer finds files by these names"



def test_universal_converter_takes_the_arguments_we_pass(deepspeed, monkeypatch):
    """(6) ds_to_universal.main(args) reads the fields of its own command line: ours are exactly those."""
    import contextlib
    import io
    import sys

    from deepspeed.checkpoint import ds_to_universal

    monkeypatch.setattr(sys, "argv", ["ds_to_universal", "--input_folder", "a", "--output_folder", "b"])
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = vars(ds_to_universal.parse_arguments())
    seen = {}
    monkeypatch.setattr(ds_to_universal, "main", lambda args: seen.update(vars(args)))
    compat.to_universal("a", "b")
    assert seen.keys() == theirs.keys(), sorted(set(seen) ^ set(theirs))
    assert (seen["inject_missing_state"], seen["strict"]) == (True, True)


_FRESH_IMPORT = """
import sys, torch
from mtx_dist.engine import _import_deepspeed
_import_deepspeed(torch.device("cpu"))
print("deepspeed.autotuning.autotuner" in sys.modules, "mlflow" in sys.modules,
      sys.modules["deepspeed.autotuning.autotuner"].has_mlflow)
import mlflow
print(mlflow.__name__, any(type(f).__name__ == "_RefusedTo" for f in sys.meta_path))
"""


def test_deepspeed_imports_its_autotuner_which_then_sees_no_mlflow():
    """(7) A fresh process: `import deepspeed` imports the autotuner, which gets no mlflow (its 0.8 s
    import is saved); mlflow imports normally afterwards, and the refusal is gone."""
    import subprocess
    run = subprocess.run([sys.executable, "-c", _FRESH_IMPORT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:2] == ["True False False", "mlflow False"], run.stdout + run.stderr[-2000:]
