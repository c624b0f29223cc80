"""Preemption and rendezvous timeouts with real processes (CPU, gloo).

SIGUSR1 reaches one rank of a two-rank torchrun job (started by ``mtx-dist launch --launcher torchrun
--run``): both ranks checkpoint at the same step and exit with 75; ``--resume latest`` finishes with
weights bit-identical to an uninterrupted run's. A rank whose peer never starts fails within
``parallel.dist_timeout_s`` with a named error instead of waiting torch's 30 minutes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from mtx_launchers.env import free_port
from mtx_launchers.signals import EXIT_CODE
from tests.helpers import DIST_VARS, REPO

pytestmark = pytest.mark.slow

STEPS, SIGNAL_STEP = 8, 3
# The signal arrives after step 3's collective; it travels with the next step's one all-reduce (the
# optimizer's non-finite flag), so every rank learns it in step 4 and checkpoints there.
STOP_STEP = SIGNAL_STEP + 1


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith(("SLURM_", "MTX_FAULTS"))}
    return {**env, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **extra}


def _args(demo_shards, run_dir):
    train, val, _ = demo_shards
    return ["train", "model.preset=micro", "optim.warmup_steps=1", "run.log_every=1", f"data.train={train}",
            f"data.val={val}", "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=32",
            "run.eval_at_end=false", "run.export_at_end=false", "tracking.enabled=false", f"run.dir={run_dir}",
            f"run.steps={STEPS}", "checkpoint.every=4", "parallel.dist_timeout_s=60"]


def _torchrun(hostfile, train_args, cwd, faults="", timeout=300):
    """``mtx-dist launch --launcher torchrun --run``: the launch command execs torchrun, which starts 2 ranks."""
    cmd = [sys.executable, "-m", "mtx_dist.cli", "launch", "--launcher", "torchrun", "--hostfile", str(hostfile),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--run", "--", *train_args]
    return subprocess.run(cmd, cwd=cwd, env=_env(MTX_FAULTS=faults), capture_output=True, text=True, timeout=timeout)


def _weights(run_dir, step):
    path = os.path.join(run_dir, "checkpoints", f"step{step:08d}", "mp_rank_00_model_states.pt")
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _states(run_dir, step):
    tag = os.path.join(run_dir, "checkpoints", f"step{step:08d}")
    return [json.load(open(os.path.join(tag, f"train_state-rank{r}.json"))) for r in (0, 1)]


@pytest.fixture(scope="module")
def whole(demo_shards, tmp_path_factory):
    """An uninterrupted two-rank run (synchronous saves): its run directory."""
    tmp = tmp_path_factory.mktemp("whole")
    hostfile = tmp / "hosts"
    hostfile.write_text("localhost slots=2\n")
    p = _torchrun(hostfile, _args(demo_shards, tmp / "run"), str(tmp))
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "run"


# async: a save every 2 steps, so one is agreed and committed by the ranks while training goes on (step 2)
# and one (step 4, the preemption's) is waited for; the resumed run does the same at 6 and 8.
@pytest.mark.parametrize("saves", [[], ["checkpoint.async=true", "checkpoint.every=2"]], ids=["sync", "async"])
def test_signal_on_one_rank_checkpoints_both_and_resume_is_exact(demo_shards, tmp_path, whole, saves):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    run = tmp_path / "run"

    # Rank 1 sends itself SIGUSR1 right after step 3; rank 0 never receives a signal.
    p = _torchrun(hostfile, [*_args(demo_shards, run), *saves], str(tmp_path), faults=f"signal=USR1:{SIGNAL_STEP}:1")
    assert p.returncode != 0
    # torchrun reports each rank's exit code; both left with the preemption code
    codes = re.findall(r"rank\s*:\s*(\d+)[^\n]*\n(?:[^\n]*\n){0,3}?\s*exitcode\s*:\s*(-?\d+)", p.stderr)
    assert sorted(codes) == [("0", str(EXIT_CODE)), ("1", str(EXIT_CODE))], p.stderr[-3000:]
    assert (f"trained to step {STOP_STEP} of {STEPS}: preempted at step {STOP_STEP} by SIGUSR1 on some rank; "
            f"every rank checkpointed") in p.stdout, p.stdout[-3000:]
    assert "every rank checkpointed; not requeued (resume with --resume latest)" in p.stdout  # not under SLURM
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{STOP_STEP:08d}"
    assert [s["step"] for s in _states(run, STOP_STEP)] == [STOP_STEP, STOP_STEP]
    assert not (run / "checkpoints" / f"step{STEPS:08d}").exists()

    p = _torchrun(hostfile, [*_args(demo_shards, run), *saves, "--resume", "latest"], str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"at step {STOP_STEP}" in p.stdout and "resumed from" in p.stdout, p.stdout[-3000:]
    assert "loss: " in p.stdout and f"(step {STOP_STEP + 1})" in p.stdout  # the resumed segment starts at 5
    ref, got = _weights(whole, STEPS), _weights(run, STEPS)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [(s["step"], s["samples"]) for s in _states(run, STEPS)] == [(STEPS, STEPS * 16)] * 2


def test_missing_peer_fails_within_the_timeout(demo_shards, tmp_path):
    """World size 2 but only rank 0 starts: the rendezvous gives up after parallel.dist_timeout_s = 5 s
    with a one-line error (the subprocess timeout guards against the 600 s default or torch's 30 min)."""
    env = _env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    args = [*_args(demo_shards, tmp_path / "run"), "parallel.dist_timeout_s=5"]
    p = subprocess.run([sys.executable, "-m", "mtx_dist.cli", *args], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "RendezvousError: rank 0 of 2 (from env) could not form the process group at 127.0.0.1:" in p.stderr
    assert "within parallel.dist_timeout_s = 5 s" in p.stderr and "1/2 clients joined" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_bad_preemption_signal_is_a_config_error():
    from mtx_dist.config import ConfigError, load_config
    from mtx_dist.trainer import train
    with pytest.raises(ConfigError, match="config key 'run.preemption_signals' = 'USR1,KILL': 'KILL' is not a signal "
                                          "that can be handled"):
        train(load_config(None, ["run.preemption_signals=USR1,KILL"]))  # before any process group starts


def test_sigterm_to_the_whole_process_group_checkpoints_with_loader_workers(demo_shards, tmp_path):
    """A cluster's SIGTERM reaches every process of the job, loader workers included (torch makes its
    workers die on SIGTERM): the workers must outlive it so that the trainer can checkpoint and exit 75."""
    run_dir = tmp_path / "run"
    args = _args(demo_shards, run_dir)
    args = [a for a in args if not a.startswith(("run.steps=", "data.workers=", "checkpoint.every="))]
    args += ["run.steps=100000", "data.workers=2", "checkpoint.every=5"]
    proc = subprocess.Popen([sys.executable, "-m", "mtx_dist.cli", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + 240
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert latest.exists(), "no first checkpoint"
        workers = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) >= 3  # the trainer and its two loader workers share the process group
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == EXIT_CODE, err[-3000:]
    step = int(re.search(r"preempted at step (\d+) by SIGTERM", out + err).group(1))
    assert (run_dir / "checkpoints" / f"step{step:08d}").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{step:08d}"
    assert "DataLoader worker" not in err
