"""Tracking into a real MLflow server (sqlite backend, proxied artifacts), started and stopped by PID:
a two-rank torchrun job logs everything there; the server dying and coming back loses nothing and
never stops training."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mtx_launchers.env import free_port
from mtx_dist.config import TrackingConfig
from mtx_dist.run_tags import git_info
from mtx_dist.tracking import RUN_ID_FILE, UNDELIVERED_FILE, Tracker
from tests.helpers import DIST_VARS, REPO
from tests.mlflow_server import GatedProxy, MlflowServer

pytestmark = pytest.mark.slow

MICRO = ["model.preset=micro", "optim.warmup_steps=2", "run.log_every=1", "data.demo_train_samples=256",
         "data.demo_val_samples=32", "data.batch_size=16", "data.workers=1", "checkpoint.every=100"]
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(str(tmp_path_factory.mktemp("mlflow-server")))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo"))


def client(server):
    from mlflow.tracking import MlflowClient
    return MlflowClient(server.url)


@contextlib.contextmanager
def training(tmp_path, args: list[str]):
    """``mtx-dist train ARGS`` in ``tmp_path`` (its own session; output in ``tmp_path``/stdout, stderr),
    killed with its process group if it still runs when the block ends."""
    out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mtx_dist", "train", *args], cwd=str(tmp_path), env=clean_env(),
                            stdout=out, stderr=err, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        out.close()
        err.close()


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": REPO, "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_two_rank_torchrun_job_logs_to_server(tmp_path, server, demo_dir):
    server.ensure()
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "mtx_dist", "train", *MICRO, "run.steps=4", f"data.demo_dir={demo_dir}", "run.name=two-ranks",
         f"tracking.uri={server.url}", "tracking.experiment=server-test", "tracking.register_as=server-encoder",
         "tracking.system_metrics_interval_s=0.5"],
        cwd=str(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained to step 4 of 4" in res.stdout
    assert "MLflow" not in res.stderr  # no tracking warning on a healthy server

    run_dir = tmp_path / "runs/quickstart"
    recorded = json.loads((run_dir / RUN_ID_FILE).read_text())
    assert recorded["tracking_uri"] == server.url
    c = client(server)
    run = c.get_run(recorded["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "two-ranks"
    assert run.data.params["model.preset"] == "micro" and run.data.params["run.steps"] == "4"
    tags = run.data.tags
    assert (tags["world_size"], tags["data_parallel"], tags["tensor_parallel"]) == ("2", "2", "1")
    assert tags["hosts"] == f"{socket.gethostname()}:0-1" and tags["num_hosts"] == "1"  # gathered from both ranks
    assert tags["mtx_dist.git_commit"] == git_info()[0] and tags["mtx_dist.git_dirty"] in ("true", "false")
    assert tags["mtx_dist.version"] and tags["launcher"] == "torchrun"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert "val/i2t_recall_at_1" in run.data.metrics
    # system metrics from one monitor for the one node (two would log every step twice), MLflow's plain names
    cpu = [m.step for m in c.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")]
    assert cpu and cpu == list(range(len(cpu))), cpu
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith(f"system/{socket.gethostname()}/")]
    # what the run read, and a description on its page
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert json.loads(inputs["training"].profile)["samples"] == 256 and inputs["training"].name.endswith("/train")
    note = run.data.tags["mlflow.note.content"]
    assert "**micro**" in note and "TP 1 x DP 2, ZeRO-0" in note and "Step 4 of 4" in note and "Held-out" in note
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # the printed link opens the run in the UI's model-training view
    assert (f"open {server.url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            "?workflowType=machine_learning") in res.stdout

    # the export went through the server's artifact proxy, byte for byte
    listed = {os.path.basename(a.path) for a in c.list_artifacts(run.info.run_id, "export")}
    local = set(os.listdir(run_dir / "export"))
    assert {"encoder.safetensors", "open_clip_model.safetensors", "MLmodel", "manifest.json"} <= local
    assert listed == local
    got = c.download_artifacts(run.info.run_id, "export/encoder.safetensors", str(tmp_path / "dl"))
    with open(got, "rb") as f:
        assert f.read() == (run_dir / "export/encoder.safetensors").read_bytes()
    manifest = json.loads((run_dir / "export/manifest.json").read_text())
    assert manifest["source"]["mlflow_run_id"] == run.info.run_id
    # ... and registered as a model version pointing at those artifacts
    versions = c.search_model_versions("name = 'server-encoder'")
    assert [(v.run_id, v.source) for v in versions] == [(run.info.run_id, f"runs:/{run.info.run_id}/export")]
    # ... which is an MLflow pyfunc model (tests/test_export_mlflow.py serves one)
    from mlflow.models import Model
    flavors = Model.load(c.download_artifacts(run.info.run_id, "export/MLmodel", str(tmp_path / "dl"))).flavors
    assert flavors["python_function"]["loader_module"] == "mtx_dist.export.pyfunc"


def test_buffered_points_reach_a_restarted_server(tmp_path, server, caplog):
    """Log, stop the server, keep logging (buffered, one warning), start it again on the same port and
    database: the next attempt delivers every buffered point at its own step."""
    caplog.set_level(logging.WARNING, logger="mtx_dist.tracking")
    server.ensure()
    t = Tracker(TrackingConfig(uri=server.url, experiment="restart", retry_s=0.0, request_timeout_s=5),
                active=True, run_dir=str(tmp_path))
    run_id = t.start("restart", {"run.steps": 6}, "")
    for step in (1, 2):
        t.log_metrics({"loss": float(step)}, step=step)
    server.stop()
    for step in (3, 4, 5):
        t.log_metrics({"loss": float(step)}, step=step)
    assert t.undelivered == 3 and t.delivered == 2
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and server.url in failed[0]
    server.start()
    t.log_metrics({"loss": 6.0}, step=6)
    assert t.undelivered == 0 and t.delivered == 6
    t.finish()
    c = client(server)
    assert c.get_run(run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(s, float(s)) for s in range(1, 7)]


def test_system_metrics_resume_after_the_server_comes_back(tmp_path, server, monkeypatch):
    """MLflow's own monitor stops at its first failed request; ours starts it again once the store is
    back, continuing the step count."""
    from mtx_dist.system_metrics import SystemMetrics
    server.ensure()
    c = client(server)
    t = Tracker(TrackingConfig(uri=server.url, experiment="system-metrics", retry_s=0.2, request_timeout_s=2),
                active=True, run_dir=str(tmp_path))
    run_id = t.start("sys", {}, "")
    key = "system/cpu_utilization_percentage"

    def steps() -> list[int]:
        return [m.step for m in c.get_metric_history(run_id, key)]

    def wait_for(check, what: str) -> list[int]:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            seen = steps()
            if check(seen):
                return seen
            time.sleep(0.2)
        raise AssertionError(f"{what}: {steps()}")

    # MLflow's own monitor keeps MLflow's request settings (ours apply to our client only); a process
    # that wants its requests to fail fast says so, and then the monitor gives up and is restarted.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mon = SystemMetrics(run_id, server.url, interval_s=0.2, samples=1, retry_s=0.2).start()
    try:
        before = wait_for(lambda s: len(s) >= 2, "no system metrics arrived")
        server.stop(signal.SIGKILL)
        time.sleep(2.0)  # the monitor's requests fail meanwhile: it gives up, ours waits and retries
        server.ensure()
        after = wait_for(lambda s: s and max(s) >= max(before) + 3, "system metrics did not resume")
    finally:
        mon.stop()
        t.finish()
    assert mon.restarts >= 1
    assert after == sorted(set(after))  # one count, continued: no step logged twice
    assert "system/system_memory_usage_megabytes" in c.get_run(run_id).data.metrics


def test_server_killed_mid_run_does_not_stop_training(tmp_path, server, demo_dir):
    server.ensure()
    steps = 24
    run_dir = tmp_path / "runs/quickstart"
    with training(tmp_path, [*MICRO, f"run.steps={steps}", f"data.demo_dir={demo_dir}", "run.eval_at_end=false",
                             f"tracking.uri={server.url}", "tracking.experiment=kill-test", "tracking.retry_s=1",
                             "tracking.request_timeout_s=5"]) as proc:
        # wait for the run to exist and its first loss to arrive, then kill the server (SIGKILL: no goodbye)
        c, deadline, seen = client(server), time.monotonic() + 240, []
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / RUN_ID_FILE).exists():
                run_id = json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"]
                seen = c.get_metric_history(run_id, "train/loss")
                if seen:
                    break
            time.sleep(0.2)
        assert seen, "no loss arrived at the server"
        server.stop(signal.SIGKILL)
        code = proc.wait(timeout=300)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert code == 0, stderr[-3000:]
    assert f"trained to step {steps} of {steps}" in stdout
    assert f"MLflow: logging in {server.url} failed" in stderr and "training continues" in stderr
    assert "were not delivered" in stderr
    # what the dead server did not take is on disk, up to the last step, nothing silently lost
    rows = [json.loads(line) for line in (run_dir / UNDELIVERED_FILE).read_text().splitlines()]
    loss_steps = [r["step"] for r in rows if r["key"] == "train/loss"]
    assert rows and {r["run_id"] for r in rows} == {run_id}
    assert loss_steps == list(range(loss_steps[0], steps + 1)) and loss_steps[0] > seen[0].step
    assert (run_dir / "export/encoder.safetensors").exists()


def test_store_outage_mid_run_training_continues_and_system_metrics_resume(tmp_path, server, demo_dir):
    """One training run through a store outage: the server is killed and comes back while the run trains;
    training goes on, and both the system metrics (our restarted monitor, its step count continued)
    and the training curves resume on the same run. The run is then preempted (SIGTERM: checkpoint, 75)."""
    server.ensure()
    run_dir = tmp_path / "runs/quickstart"
    key = "system/cpu_utilization_percentage"
    with training(tmp_path, [*MICRO, "run.steps=1000000", f"data.demo_dir={demo_dir}", "run.eval_at_end=false",
                             "run.export_at_end=false", f"tracking.uri={server.url}", "tracking.experiment=outage-test",
                             "tracking.retry_s=0.5", "tracking.request_timeout_s=2",
                             "tracking.system_metrics_interval_s=0.2", "tracking.system_metrics_samples=1"]) as proc:
        c = client(server)

        def history(name: str) -> list[int]:
            return [m.step for m in c.get_metric_history(run_id, name)]

        def wait_for(check, what: str) -> None:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if check():
                        return
                except Exception:  # the server is still starting
                    pass
                time.sleep(0.2)
            raise AssertionError(f"{what} (trainer exit code {proc.poll()}): {err_tail()}")

        def err_tail() -> str:
            return (tmp_path / "stderr").read_text()[-2000:]

        wait_for(lambda: (run_dir / RUN_ID_FILE).exists(), "the run never started")
        run_id = json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"]
        wait_for(lambda: len(history(key)) >= 2 and history("train/loss"), "no system metrics or loss arrived")
        sys_before, loss_before = max(history(key)), max(history("train/loss"))
        server.stop(signal.SIGKILL)
        time.sleep(3.0)  # requests fail meanwhile; the monitor gives up and ours retries
        server.ensure()
        wait_for(lambda: max(history(key)) >= sys_before + 3, "system metrics did not resume")
        wait_for(lambda: max(history("train/loss")) > loss_before + 5, "training curves did not resume")
        assert proc.poll() is None, err_tail()  # still training through all of it
        proc.send_signal(signal.SIGTERM)  # preemption: checkpoint and leave with 75
        code = proc.wait(timeout=120)
    assert code == 75, (tmp_path / "stderr").read_text()[-3000:]
    steps = history(key)
    assert steps == sorted(set(steps))  # one count, continued: no system-metrics step logged twice
    note = c.get_run(run_id).data.tags["mlflow.note.content"]  # the description says how the run ended
    assert "(stopped by SIGTERM; not requeued)" in note, note


def test_a_slow_store_never_holds_up_logging(server):
    """Behind a proxy that holds every request (a live store that answers as late as the test wants),
    the trainer's background tracker returns from every log call at once while its delivery thread
    waits on the store; once the store answers, every point arrives at its step."""
    server.ensure()
    proxy = GatedProxy(server.url)
    try:
        t = Tracker(TrackingConfig(uri=proxy.url, experiment="slow-store", request_timeout_s=300), active=True,
                    background=True)
        run_id = t.start("slow", {"run.steps": 200}, "")
        assert run_id is not None  # the gate was open: a healthy store names the run at start
        proxy.gate.clear()
        t.log_metrics({"loss": 0.0}, step=0)
        deadline = time.monotonic() + 120
        while proxy.held == 0:  # the delivery thread's request is now waiting at the gate
            assert time.monotonic() < deadline, "the delivery thread sent nothing"
            time.sleep(0.05)
        for step in range(1, 201):  # with a synchronous tracker the first call would wait at the gate
            t.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
        assert proxy.held >= 1 and t.delivered == 0  # all of that while the store had not answered once
        proxy.gate.set()
        t.finish()
        assert t.undelivered == 0 and t.delivered == 401
        history = client(server).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(201))
        assert client(server).get_run(run_id).info.status == "FINISHED"
    finally:
        proxy.close()
