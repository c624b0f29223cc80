"""slurm/pretrain.sbatch on a real two-node SLURM cluster (CPU, gloo): a whole run, a run preempted
with ``scancel --signal=USR1 --full`` that checkpoints, requeues itself and finishes from the checkpoint,
and a run in which one rank hangs: the hang watchdog ends it, rank 0 requeues it, and it finishes from
the last checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import DIST_VARS, REPO

pytestmark = pytest.mark.slow

SBATCH = os.path.join(REPO, "slurm", "pretrain.sbatch")
STEPS = 30
GLOBAL_BATCH = 2 * 8
JOB_TIMEOUT_S = 240
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _submit(cluster, demo_shards, work, name, *more, faults=""):
    train, val, _ = demo_shards
    overrides = ["model.preset=micro", "optim.warmup_steps=1", "run.log_every=5", f"data.train={train}",
                 f"data.val={val}", "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=32",
                 "run.eval_at_end=false", "run.export_at_end=false", f"run.dir={work}/{name}", f"run.name={name}",
                 f"run.steps={STEPS}", "checkpoint.every=5", "parallel.dist_timeout_s=60", *more]
    env = {k: v for k, v in cluster.env.items() if k not in DIST_VARS and not k.startswith("SLURM_")}
    env.update(SLURM_CONF=cluster.conf, PYTHONPATH=REPO, OMP_NUM_THREADS="1",
               MTX_DIST=f"{sys.executable} -m mtx_dist.cli", MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db",
               OVERRIDES=" ".join(overrides))
    if faults:  # the first run only: the requeued job must run clean
        env.update(MTX_FAULTS=faults, MTX_FAULTS_RESTART="0")
    out = f"{work}/{name}.out"
    # 2 nodes x 1 task, no GPUs: the CPU/gloo form of the script's 8-GPU defaults
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                         f"--job-name={name}", f"--output={out}", f"--chdir={work}", SBATCH, env=env)
    return job, out


def _requeued_then_completed(cluster, job, out) -> str:
    """Wait for the job's one requeue, start it at once, wait for it to complete; returns its log."""
    info = cluster.wait(job, lambda i: i.get("Restarts") == "1" or i.get("JobState") in ENDED, JOB_TIMEOUT_S)
    assert info.get("Restarts") == "1", _log(out)[-3000:]
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env, capture_output=True,
                   timeout=30)  # skip the requeue's start delay
    info = cluster.wait(job, lambda i: i.get("JobState") in ENDED, JOB_TIMEOUT_S)
    log = _log(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    return log


def _log(path):
    with open(path, errors="replace") as f:
        return f.read().replace("\r", "\n")


def _weights(run_dir, step):
    tag = os.path.join(run_dir, "checkpoints", f"step{step:08d}", "mp_rank_00_model_states.pt")
    return torch.load(tag, map_location="cpu", weights_only=False)["module"]


def _mlflow_run(work, name):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("mtx-dist")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # a requeued job continues its run
    return client, runs[0]


def test_nodelist_parsing_agrees_with_scontrol(cluster):
    from mtx_launchers import parse_nodelist
    for text in ("gpu-[001-004,010],cpu7", "a[01-02]b[1-2]", "x[098-101],y", "a[1-2]-[3-4]", "n[1-2]"):
        assert parse_nodelist(text) == cluster.scontrol("show", "hostnames", text).split(), text


@pytest.fixture(scope="module")
def reference(cluster, demo_shards, tmp_path_factory):
    """An uninterrupted job: (work dir, job id, job info, log)."""
    work = str(tmp_path_factory.mktemp("slurm-jobs"))
    job, out = _submit(cluster, demo_shards, work, "reference")
    info = cluster.wait(job, lambda i: i.get("JobState") in ENDED, JOB_TIMEOUT_S)
    return work, job, info, _log(out)


def test_pretrain_sbatch_runs_two_ranks_on_two_nodes(reference):
    work, job, info, log = reference
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert (info["NumNodes"], info["NumTasks"], info["NodeList"]) == ("2", "2", "n[1-2]")
    assert f"mtx-dist job {job} restart 0: 2 tasks on n[1-2]" in log
    assert "master address: 127.0.0.1" in log  # n1's NodeAddr: its name does not resolve
    assert f"trained to step {STEPS} of {STEPS}" in log
    manifest = json.load(open(os.path.join(work, "reference", "checkpoints", f"step{STEPS:08d}", "checkpoint.json")))
    assert manifest["world_size"] == 2 and manifest["train_states"] == ["train_state-rank0.json",
                                                                       "train_state-rank1.json"]
    _, run = _mlflow_run(work, "reference")
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("world_size") == "2", run.data.tags
    assert run.data.tags.get("launcher") == "slurm", run.data.tags


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(cluster, demo_shards, reference):
    work = reference[0]
    job, out = _submit(cluster, demo_shards, work, "preempted")
    latest = os.path.join(work, "preempted", "checkpoints", "latest")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not os.path.exists(latest):  # step 5 is saved: training is under way, 25 steps to go
        assert time.monotonic() < deadline, "no checkpoint appeared: " + _log(out)[-3000:]
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), _log(out)[-3000:]
        time.sleep(0.2)
    cluster.scancel("--signal=USR1", "--full", job)  # the batch shell and every task of the step

    log = _requeued_then_completed(cluster, job, out)

    preempted = re.search(r"preempted at step (\d+) by SIGUSR1 on some rank; every rank checkpointed; "
                          rf"requeueing SLURM job {job}", log)
    assert preempted, log[-3000:]
    step = int(preempted.group(1))
    assert 5 <= step < STEPS
    assert f"mtx-dist job {job} restart 1: 2 tasks" in log  # SLURM_RESTART_COUNT=1 in the second run
    assert re.search(rf"resumed from \S+/step{step:08d} at step {step}\b", log), log[-3000:]
    assert f"trained to step {STEPS} of {STEPS}" in log

    # Nothing trained twice or skipped: the final weights equal the uninterrupted job's, bit for bit.
    ref, got = _weights(os.path.join(work, "reference"), STEPS), _weights(os.path.join(work, "preempted"), STEPS)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    for rank in (0, 1):
        state = json.load(open(os.path.join(work, "preempted", "checkpoints", f"step{STEPS:08d}",
                                            f"train_state-rank{rank}.json")))
        assert (state["step"], state["samples"]) == (STEPS, STEPS * GLOBAL_BATCH)

    # One MLflow run across the requeue; every logged step once, with the uninterrupted job's loss
    # wherever the logging window lies wholly on one side of the preemption.
    client, run = _mlflow_run(work, "preempted")
    _, ref_run = _mlflow_run(work, "reference")
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(5, STEPS + 1, 5)), steps
    ref_history = {m.step: m.value for m in client.get_metric_history(ref_run.info.run_id, "train/loss")}
    for s in history:
        if not s - 5 < step < s:
            assert history[s] == pytest.approx(ref_history[s], rel=1e-6, abs=1e-7), s
    assert run.info.status == "FINISHED"


def test_hung_rank_ends_the_job_which_requeues_and_finishes_from_the_last_checkpoint(cluster, demo_shards,
                                                                                   reference):
    """Rank 1 (node n2) hangs after step 12, outside any collective; rank 0 waits in step 13's. Both
    watchdogs fire after run.hang_timeout_s, write their stacks; rank 0 requeues; the restarted job
    resumes from step 10 and ends with the uninterrupted job's weights."""
    work = reference[0]
    job, out = _submit(cluster, demo_shards, work, "hung", "run.hang_timeout_s=30", faults="hang=step:12:1")
    log = _requeued_then_completed(cluster, job, out)
    assert f"hang watchdog: requeued SLURM job {job}" in log, log[-3000:]
    hung = open(os.path.join(work, "hung", "hang-rank1.txt")).read()
    waiting = open(os.path.join(work, "hung", "hang-rank0.txt")).read()
    assert "last completed step 11, phase 'step'" in hung and "injected_hang" in hung
    assert "last completed step 12, phase 'step'" in waiting and "injected_hang" not in waiting
    assert re.search(r"resumed from \S+/step00000010 at step 10\b", log), log[-3000:]
    assert f"trained to step {STEPS} of {STEPS}" in log
    ref, got = _weights(os.path.join(work, "reference"), STEPS), _weights(os.path.join(work, "hung"), STEPS)
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # steps 11-12 trained again, exactly as before
    client, run = _mlflow_run(work, "hung")
    assert run.info.status == "FINISHED" and "last completed step 12" in run.data.tags["mtx_dist.hang"]
