"""Non-finite steps and dead ranks, injected with MTX_FAULTS into real multi-process runs (CPU, gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mtx_dist.parallel.consolidate import consolidate_checkpoint
from tests import dist_workers as w
from tests.dist import run_ranks
from tests.helpers import DIST_VARS, REPO

pytestmark = pytest.mark.slow


def _base(demo_shards, tmp_path, *overrides):
    train, val, _ = demo_shards
    return ["model.preset=micro", "optim.warmup_steps=1", "run.log_every=1", f"data.train={train}",
            f"data.val={val}", "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=32",
            "run.eval_at_end=false", "run.export_at_end=false", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"run.dir={tmp_path}/run", *overrides]


def _tag(tmp_path, step):
    return tmp_path / "run" / "checkpoints" / f"step{step:08d}"


def _module(tag_dir):
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_nan_on_one_rank_skips_the_step_on_both(demo_shards, tmp_path, stage):
    """NaN loss on rank 0 only at step 3: both ranks skip it; parameters (and at stage 0 the Adam state)
    after step 3 equal those after step 2; step 4 trains again."""
    base = _base(demo_shards, tmp_path, "run.steps=4", "checkpoint.every=1",
                 f"parallel.zero_stage={stage}")
    results = run_ranks(2, w.train_with_faults, base, "nan=loss:3:0", timeout=300)
    assert all(r["step"] == 4 for r in results)
    losses = results[0]["losses"]
    assert len(losses) == 4 and all(x == x for x in losses[:2] + losses[3:]) and losses[2] != losses[2]
    s2, s3, s4 = (consolidate_checkpoint(str(_tag(tmp_path, s))) for s in (2, 3, 4))
    for name, value in s2.items():
        assert torch.equal(value, s3[name]), name
    assert any(not torch.equal(v, s4[n]) for n, v in s3.items())
    if stage == 0:
        a, b = (_module(_tag(tmp_path, s))["optimizer"]["state"] for s in (2, 3))
        assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) and a[i]["step"] == b[i]["step"] for i in a)
    states = [json.loads((_tag(tmp_path, 4) / f"train_state-rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["skipped_steps"] for s in states] == [1, 1]


def test_consecutive_non_finite_steps_stop_the_run_cleanly(demo_shards, tmp_path):
    base = _base(demo_shards, tmp_path, "run.steps=8", "checkpoint.every=2", "optim.max_skipped_steps=3")
    results = run_ranks(2, w.train_with_faults, base, "nan=loss:3:1,nan=loss:4:1,nan=loss:5:1", timeout=300)
    for r in results:  # both ranks stop at the same step with the same message
        assert "3 consecutive steps had a non-finite loss" in r["stopped"] and "stopping at step 5" in r["stopped"]
        assert "Parameters are those of step 2" in r["stopped"]
    good, during = _module(_tag(tmp_path, 2)), _module(_tag(tmp_path, 4))
    assert all(torch.equal(v, during["module"][n]) for n, v in good["module"].items())
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step00000004"


def _launch(rank, port, args, cwd, faults_spec=""):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=REPO, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MTX_FAULTS=faults_spec)
    return subprocess.Popen([sys.executable, "-m", "mtx_dist.cli", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_pair(args, cwd, faults_spec="", timeout=300):
    from mtx_launchers.env import free_port
    port = free_port()
    procs = [_launch(r, port, args, cwd, faults_spec) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return procs, outs


def test_killed_rank_the_other_exits_within_the_timeout_and_resume_is_exact(demo_shards, tmp_path):
    """kill -9 of rank 1 right after step 3 (checkpoint at 2): rank 0 fails within dist_timeout_s instead
    of hanging; `--resume latest` on both ranks finishes, with weights bit-identical to an
    uninterrupted run's."""
    timeout_s = 30
    common = _base(demo_shards, tmp_path, "run.steps=6", "checkpoint.every=2", f"parallel.dist_timeout_s={timeout_s}",
                   "tracking.enabled=false")
    whole = [a if not a.startswith("run.dir=") else f"run.dir={tmp_path}/whole" for a in common]
    procs, outs = _run_pair(whole, str(tmp_path))
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]

    from mtx_launchers.env import free_port
    port = free_port()
    victim = _launch(1, port, common, str(tmp_path), "kill=step:3:1")
    survivor = _launch(0, port, common, str(tmp_path), "kill=step:3:1")
    try:
        victim.communicate(timeout=300)
        # the survivor leaves on the collective timeout instead of hanging (communicate raises otherwise)
        _, err = survivor.communicate(timeout=timeout_s + 120)
    finally:
        victim.kill()
        survivor.kill()
    assert victim.returncode == -9
    assert survivor.returncode not in (0, None), err[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step00000002"

    procs, outs = _run_pair([*common, "--resume", "latest"], str(tmp_path))
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert "resumed from" in outs[0][0] and "at step 2" in outs[0][0]
    resumed = _module(tmp_path / "run" / "checkpoints" / "step00000006")
    reference = _module(tmp_path / "whole" / "checkpoints" / "step00000006")
    for name, value in reference["module"].items():
        assert torch.equal(value, resumed["module"][name]), name
