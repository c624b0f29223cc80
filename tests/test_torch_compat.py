"""The torch internals mtx-dist relies on (mtx_dist.torch_compat), each checked against the installed
torch: a failure names the assumption that no longer holds."""

import inspect
import subprocess
import sys

import pytest
import torch

from mtx_dist import torch_compat as compat
from mtx_dist.optim import GuardedAdamW
from tests.helpers import fresh_env


def test_optimizer_methods_are_lazily_dynamo_disabled_with_a_cache_on_the_undecorated_function():
    """(1) The wrapper torch puts on the optimizer's methods caches its result under the name we fill."""
    import torch._compile
    assert f'"{compat._CACHE}"' in inspect.getsource(torch._compile._disable_dynamo)
    for name in compat.DISABLED_OPTIMIZER_METHODS:
        method = getattr(torch.optim.Optimizer, name)
        assert callable(getattr(method, "__wrapped__", None)), f"Optimizer.{name} has no __wrapped__"
        assert method.__wrapped__.__name__ == name
    # (torch wraps a class's step in its hook wrapper once an instance is built: unwrap both)
    assert inspect.unwrap(torch.optim.AdamW.step) is inspect.unwrap(torch.optim.Adam.step), \
        "AdamW now has a step of its own"
    step = compat._ADAM_STEP
    assert not hasattr(step, "__wrapped__") and step.__qualname__ == "Adam.step" and step.__code__.co_name == "step"


def test_our_adamw_step_equals_torchs_bit_for_bit():
    """(1) Stepping through the undecorated Adam.step is torch's AdamW step (fused), to the bit."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (1000, 16)]
    ours_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    kw = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, fused=True)
    ours, theirs = GuardedAdamW(ours_p, **kw), torch.optim.AdamW(theirs_p, **kw)
    for step in range(3):
        for a, b in zip(ours_p, theirs_p):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        assert torch.equal(a, b)
    for a, b in zip(ours.state.values(), theirs.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


_FRESH_SWITCH = """
import sys, torch
from mtx_dist import torch_compat as compat
assert compat.optimizer_without_dynamo()
fn = torch.optim.Optimizer.zero_grad.__wrapped__
opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
opt.zero_grad()
before = "torch._dynamo" in sys.modules
import torch._dynamo
opt.zero_grad()
print(before, getattr(getattr(fn, compat._CACHE), "_torchdynamo_disable", False))
"""


def test_optimizer_methods_are_marked_as_torch_would_once_dynamo_is_imported():
    """(1) Unmarked while torch._dynamo is absent; once anything imports it (a later torch.compile in the
    same process), the next call marks the method untraceable, as torch's own wrapper does."""
    run = subprocess.run([sys.executable, "-c", _FRESH_SWITCH], capture_output=True, text=True, timeout=120,
                         env=fresh_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "True"], run.stdout


_FRESH_TRAIN = """
import sys
from mtx_dist.cli import main
args = ["train", "model.preset=micro", "optim.warmup_steps=1", "data.demo_train_samples=64",
        "data.demo_val_samples=16", "data.batch_size=8", "data.workers=1", "checkpoint.every=2",
        "run.eval_at_end=false", "run.export_at_end=false", "tracking.enabled=false", "run.dir=run"]
assert main([*args, "run.steps=2"]) == 0
assert main([*args, "run.steps=4", "--resume", "latest"]) == 0
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


@pytest.mark.slow
def test_an_eager_training_run_and_its_resume_never_import_dynamo(tmp_path):
    """(1) A fresh process trains, checkpoints, resumes (optimizer state_dict and load_state_dict) and
    trains on without importing torch._dynamo (0.85 s of every start-up)."""
    run = subprocess.run([sys.executable, "-c", _FRESH_TRAIN], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=fresh_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained to step 4 of 4" in run.stdout, run.stdout
    assert run.stdout.strip().endswith("dynamo imported: False"), run.stdout + run.stderr[-2000:]

