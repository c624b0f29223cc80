"""The hang watchdog: limits per phase, the stack file it writes, and a real 2-rank torchrun job in
which one rank hangs outside any collective (MTX_FAULTS=hang=step:3:1)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from mtx_launchers.env import free_port
from mtx_dist import watchdog as wd
from tests.helpers import DIST_VARS, REPO

HANG_GUARD_S = 240  # a test that waits longer than this has hung itself: fail it


def test_limits_auto_fixed_and_long_phases(monkeypatch):
    dog = wd.HangWatchdog("/nonexistent", 0)
    assert dog.limit("step") == wd.FLOOR_S and dog.limit("first step") == wd.LONG_PHASE_S
    t = [0.0]
    monkeypatch.setattr(wd, "_clock", lambda: t[0])  # step times of 100 s: the auto limit is 20x their median
    dog.beat(0, "step")
    for step in range(1, 6):
        t[0] += 100.0
        dog.beat(step)
    dog.beat(5, "checkpoint")  # a checkpoint's time is not a step time
    t[0] += 5000.0
    dog.beat(5)
    t[0] += 100.0
    dog.beat(6)
    assert list(dog._step_times) == [100.0] * 6
    assert dog.limit("step") == 2000.0 and dog.limit("checkpoint") == wd.LONG_PHASE_S
    dog.collective_timeout_s = 600.0  # the waiting ranks' collectives time out after 600 s: fire before
    assert dog.limit("step") == 480.0 and dog.limit("export") == wd.LONG_PHASE_S
    dog.min_step_limit_s = wd.LONG_PHASE_S  # run.compile: any step may recompile
    assert dog.limit("step") == wd.LONG_PHASE_S
    fixed = wd.HangWatchdog("/nonexistent", 0, timeout_s=5000.0, collective_timeout_s=6000.0)
    assert fixed.limit("step") == 5000.0 and fixed.limit("evaluation") == 5000.0


def stuck_in_a_named_frame(release: threading.Event) -> None:
    release.wait(HANG_GUARD_S)


def test_fires_with_the_stacks_of_every_thread(tmp_path):
    reported = []
    release = threading.Event()
    worker = threading.Thread(target=stuck_in_a_named_frame, args=(release,))
    worker.start()  # before the watchdog can fire
    dog = wd.HangWatchdog(str(tmp_path), 3, timeout_s=0.3, on_hang=lambda path, what: reported.append((path, what)),
                          exit_process=False)
    dog.start(step=7)
    for step in range(8, 11):
        dog.beat(step)
    deadline = time.monotonic() + HANG_GUARD_S
    while dog.fired is None and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    worker.join()
    dog.stop()
    text = (tmp_path / "hang-rank3.txt").read_text()
    assert dog.fired == str(tmp_path / "hang-rank3.txt")
    assert text.startswith("rank 3 (") and "last completed step 10, phase 'step'" in text and "limit 0 s" in text
    assert "stuck_in_a_named_frame" in text  # the other thread's stack is in the file
    assert reported == [(dog.fired, text.splitlines()[0])]


def test_a_stopped_watchdog_never_fires(tmp_path):
    dog = wd.HangWatchdog(str(tmp_path), 0, timeout_s=2.0, exit_process=False).start()
    dog.stop()
    time.sleep(3.0)
    assert dog.fired is None and not os.listdir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fault,hung_after,frame", [("hang=step:3:1", 2, "injected_hang"),
                                                    ("hang=loader:4:1", 3, "_hang_injectable")],
                         ids=["step", "loader"])
def test_a_rank_hung_outside_collectives_ends_the_torchrun_job_with_both_stacks(demo_shards, tmp_path, fault,
                                                                               hung_after, frame):
    """Rank 1 hangs after step 3 (not in a collective: in the trainer, or waiting for its loader's 4th
    batch); rank 0 waits for it in step 4's collectives. Both watchdogs fire, write their stacks (rank
    1's names the hung frame), rank 0 reports the hang to MLflow, and the job ends with exit code 76
    instead of idling."""
    from mlflow.tracking import MlflowClient

    train, val, _ = demo_shards
    store = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=REPO, MTX_FAULTS=fault, MLFLOW_DISABLE_TELEMETRY="true")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "mtx_dist", "train", "model.preset=micro", "optim.warmup_steps=1", "run.steps=8", f"data.train={train}",
         f"data.val={val}", "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=32", "checkpoint.every=2",
         "run.hang_timeout_s=15", f"run.dir={tmp_path}/run", f"tracking.uri={store}", "tracking.system_metrics=false"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "exiting with code 76" in out, out[-3000:]
    hung = (tmp_path / "run/hang-rank1.txt").read_text()
    waiting = (tmp_path / "run/hang-rank0.txt").read_text()
    assert f"last completed step {hung_after}, phase 'step'" in hung and "injected_hang" in hung and frame in hung
    assert "last completed step 3, phase 'step'" in waiting and "all_gather" in waiting  # in step 4's loss
    assert "injected_hang" not in waiting
    # the last checkpoint (step 2) is intact for the restart
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step00000002"
    client = MlflowClient(store)
    (run,) = client.search_runs(client.get_experiment_by_name("mtx-dist").experiment_id)
    assert run.info.status == "FAILED" and "last completed step 3" in run.data.tags["mtx_dist.hang"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "hangs")] == ["hangs/hang-rank0.txt"]
