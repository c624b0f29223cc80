"""The deepspeed launcher and torchrun start the same two-rank job to the same losses (CPU, fp32, gloo).

Each job tracks into its own sqlite store; the per-step losses are read back from MLflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from mtx_launchers.env import free_port
from mtx_dist.tracking import RUN_ID_FILE
from tests.helpers import DIST_VARS, REPO

pytestmark = pytest.mark.slow

STEPS = 4
JOB = ["train", "model.preset=micro", f"run.steps={STEPS}", "optim.warmup_steps=2", "run.log_every=1",
       "data.demo_train_samples=256", "data.demo_val_samples=32", "data.batch_size=8", "data.workers=1",
       "run.eval_at_end=false", "run.export_at_end=false", "checkpoint.every=100"]


def _launch(kind: str, cwd: str, demo_dir: str) -> tuple[list[tuple[int, float]], dict]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and k != "MLFLOW_TRACKING_URI"}
    # torchrun sets OMP_NUM_THREADS=1 for several local ranks, the deepspeed launcher leaves it unset
    # (all cores): a different intra-op split changes the last bits of fp32 sums. Same threads, same bits.
    env.update(PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    port = str(free_port())
    if kind == "deepspeed":
        deepspeed = shutil.which("deepspeed")
        assert deepspeed, "the deepspeed launcher is not on PATH"
        launcher = [sys.executable, deepspeed, "--num_gpus", "2", "--master_port", port, "--module", "mtx_dist"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                    "-m", "mtx_dist"]
    uri = f"sqlite:///{cwd}/mlflow.db"
    res = subprocess.run([*launcher, *JOB, f"data.demo_dir={demo_dir}", f"tracking.uri={uri}"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{kind}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert f"trained to step {STEPS} of {STEPS}" in res.stdout

    from mlflow.tracking import MlflowClient
    with open(os.path.join(cwd, "runs/quickstart", RUN_ID_FILE)) as f:
        run_id = json.load(f)["run_id"]
    c = MlflowClient(uri)
    history = [(m.step, m.value) for m in c.get_metric_history(run_id, "train/loss")]
    return sorted(history), c.get_run(run_id).data.tags


def test_deepspeed_launcher_and_torchrun_train_identically(tmp_path):
    demo = str(tmp_path / "demo")
    runs = {}
    for kind in ("torchrun", "deepspeed"):
        cwd = tmp_path / kind
        cwd.mkdir()
        runs[kind] = _launch(kind, str(cwd), demo)
    (ref, ref_tags), (got, got_tags) = runs["torchrun"], runs["deepspeed"]
    assert [s for s, _ in ref] == list(range(1, STEPS + 1))
    assert [s for s, _ in got] == [s for s, _ in ref]
    # same ranks, same data split, same fp32 arithmetic on CPU: the same losses, bit for bit
    assert [v for _, v in got] == [v for _, v in ref]
    for tags in (ref_tags, got_tags):
        assert (tags["world_size"], tags["data_parallel"], tags["tensor_parallel"]) == ("2", "2", "1")
    assert (ref_tags["launcher"], got_tags["launcher"]) == ("torchrun", "deepspeed")
