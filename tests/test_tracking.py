"""The MLflow tracker's guard, buffer, retry, run continuation and model registration, in process,
against real stores: a closed loopback port (nothing listening), a sqlite store whose path is blocked
by a file until the test unblocks it, and a working sqlite store."""

import json
import logging
import os
import re

import pytest

from mtx_launchers.env import DistEnv, free_port
from mtx_dist.config import TrackingConfig
from mtx_dist.run_tags import cluster_tags, git_info, host_ranges, launcher_name
from mtx_dist.mlflow_requests import request_policy
from mtx_dist.tracking import RUN_ID_FILE, UNDELIVERED_FILE, Tracker


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """A sqlite store keeps artifacts under ./mlruns of the working directory: keep them in tmp."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the tests that need a working one (its first use migrates for seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def client(uri):
    from mlflow.tracking import MlflowClient
    return MlflowClient(uri)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "mtx_dist.tracking" and r.levelno == logging.WARNING]


def test_unreachable_server_buffers_warns_once_and_reports(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mtx_dist.tracking")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    t = Tracker(TrackingConfig(uri=uri, retry_s=0.0, buffer=5), active=True, run_dir=str(tmp_path / "run"))
    assert t.start("r", {"run.steps": 8}, "x = 1\n") is None  # no run, no exception
    for step in range(1, 5):  # two metrics per step, 8 points into a buffer of 5
        t.log_metrics({"loss": 1.0 / step, "lr": 0.1 * step}, step=step)
    assert t.run_id is None and t.delivered == 0
    assert t.undelivered == 8 and t.dropped == 3
    failed = [m for m in warnings_of(caplog) if "failed" in m]
    assert len(failed) == 1, failed  # five failed attempts, one warning (rate-limited)
    assert uri in failed[0] and "training continues" in failed[0]
    assert sum("buffer of 5 metric points is full" in m for m in warnings_of(caplog)) == 1

    t.finish()
    msgs = warnings_of(caplog)
    assert any("no run could be created" in m for m in msgs)
    report = [m for m in msgs if "were not delivered" in m]
    assert len(report) == 1 and "8 metric points (3 dropped" in report[0]
    # the newest 5 points are kept on disk, in order, with their steps
    rows = [json.loads(line) for line in (tmp_path / "run" / UNDELIVERED_FILE).read_text().splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in rows] == [
        ("lr", 2, pytest.approx(0.2)), ("loss", 3, pytest.approx(1 / 3)), ("lr", 3, pytest.approx(0.3)),
        ("loss", 4, 0.25), ("lr", 4, pytest.approx(0.4))]
    assert not (tmp_path / "run" / RUN_ID_FILE).exists()


def test_backoff_defers_retries(tmp_path):
    """Within retry_s of a failure, logging only buffers (no new attempt): the failure count stays."""
    t = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", retry_s=3600.0), active=True)
    t.start("r", {}, "")
    assert t._failures == 1
    for step in range(1, 50):
        t.log_metrics({"loss": 1.0}, step=step)
    assert t._failures == 1 and t.undelivered == 49
    t.finish()  # the final attempt ignores the backoff
    assert t._failures == 2


def test_store_that_comes_back_gets_the_run_and_every_buffered_point(tmp_path, caplog):
    """The store is unusable at start (its directory is a file); once fixed, the next log call creates
    the run, logs params/tags/config, then all buffered points at their original steps."""
    caplog.set_level(logging.WARNING, logger="mtx_dist.tracking")
    blocker = tmp_path / "db"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker}/mlflow.db"
    run_dir = tmp_path / "run"
    t = Tracker(TrackingConfig(uri=uri, retry_s=0.0), active=True, run_dir=str(run_dir))
    assert t.start("late", {"run.steps": 4}, "[run]\nsteps = 4\n", tags={"world_size": "1"}) is None
    t.log_metrics({"loss": 4.0}, step=1)
    t.log_metrics({"loss": 3.0}, step=2)
    assert t.run_id is None and t.undelivered == 2
    blocker.unlink()
    blocker.mkdir()
    t.log_metrics({"loss": 2.0}, step=3)
    assert t.run_id is not None and t.undelivered == 0 and t.delivered == 3
    t.log_metrics({"loss": 1.0}, step=4)
    t.finish()
    assert any("reachable again" in m for m in warnings_of(caplog))
    c = client(uri)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "late"
    assert run.data.params == {"run.steps": "4"} and run.data.tags["world_size"] == "1"
    assert [(m.step, m.value) for m in c.get_metric_history(t.run_id, "loss")] == [(1, 4.0), (2, 3.0), (3, 2.0),
                                                                                    (4, 1.0)]
    assert json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"] == t.run_id
    assert not (run_dir / UNDELIVERED_FILE).exists()


def test_requeued_job_without_checkpoint_continues_the_recorded_run(tmp_path, store, caplog):
    caplog.set_level(logging.WARNING, logger="mtx_dist.tracking")
    cfg = TrackingConfig(uri=store, experiment="requeue")
    run_dir = str(tmp_path / "run")
    first = Tracker(cfg, active=True, run_dir=run_dir)
    run_id = first.start("job", {"run.steps": 10, "data.batch_size": 4}, "a = 1\n")
    for step in (1, 2):
        first.log_metrics({"loss": float(step)}, step=step)
    # preempted here: no finish(), no checkpoint. The requeued job resumes with no run id from a checkpoint.
    second = Tracker(cfg, active=True, run_dir=run_dir)
    assert second.start("job", {"run.steps": 10, "data.batch_size": 8}, "a = 2\n", run_id=None, step=0,
                        resume=True) == run_id
    for step in (1, 2, 3):
        second.log_metrics({"loss": 10.0 + step}, step=step)
    second.finish()
    c = client(store)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.batch_size"] == "4" and run.data.tags["resumed_override.data.batch_size"] == "8"
    assert run.data.tags["resumed_at_step"] == "0"
    steps = [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")]
    assert sorted(steps) == [(1, 1.0), (1, 11.0), (2, 2.0), (2, 12.0), (3, 13.0)]
    arts = {a.path for a in c.list_artifacts(run_id)}
    assert {"config.toml", "config-resumed-step0.toml"} <= arts

    # a fresh (not resumed) job in the same run directory starts a new run
    fresh = Tracker(cfg, active=True, run_dir=run_dir)
    assert fresh.start("job", {}, "") not in (None, run_id)
    fresh.finish()
    # the recorded run belongs to another store: not continued there
    other = f"sqlite:///{tmp_path}/other.db"
    moved = Tracker(TrackingConfig(uri=other, experiment="requeue"), active=True, run_dir=run_dir)
    assert moved.start("job", {}, "", resume=True) not in (None, run_id, fresh.run_id)
    moved.finish()
    assert any("not in " + other in m for m in warnings_of(caplog))


def test_checkpoint_run_id_missing_from_store_starts_a_new_run(tmp_path, store, caplog):
    caplog.set_level(logging.WARNING, logger="mtx_dist.tracking")
    t = Tracker(TrackingConfig(uri=store, experiment="gone"), active=True, run_dir=str(tmp_path))
    new = t.start("r", {}, "", run_id="0" * 32, step=5, resume=True)
    t.finish()
    assert new and new != "0" * 32
    assert any("does not exist there" in m for m in warnings_of(caplog))
    assert client(store).get_run(new).info.status == "FINISHED"


def test_export_artifacts_registered_as_model_version(tmp_path, store):
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    (export / "encoder.safetensors").write_bytes(b"\0" * 16)
    name = "test-encoder"
    runs = []
    for register_as in (name, name, ""):
        t = Tracker(TrackingConfig(uri=store, experiment="registry", register_as=register_as), active=True)
        runs.append(t.start("r", {}, ""))
        t.log_artifacts(str(export), "export")
        t.register_model("export")
        t.finish()
        assert t.undelivered == 0
    c = client(store)
    versions = sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [(int(v.version), v.run_id) for v in versions] == [(1, runs[0]), (2, runs[1])]  # not the third run
    assert versions[0].source == f"runs:/{runs[0]}/export"
    assert {a.path for a in c.list_artifacts(runs[2], "export")} == {"export/manifest.json",
                                                                      "export/encoder.safetensors"}


def test_inactive_tracker_does_nothing(tmp_path):
    t = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{free_port()}"), active=False, run_dir=str(tmp_path))
    assert t.start("r", {}, "") is None
    t.log_metrics({"loss": 1.0}, step=1)
    t.finish()
    assert t.undelivered == 0 and os.listdir(tmp_path) == []


def test_host_ranges_and_git_info(tmp_path):
    assert host_ranges(["a", "a", "b", "b", "a"]) == "a:0-1,b:2-3,a:4"
    assert host_ranges(["n1"]) == "n1:0"
    commit, dirty = git_info()
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and dirty in ("true", "false")
    assert git_info(str(tmp_path)) == ("unknown", "unknown")  # not a git checkout
    # code in an untracked folder of some other repository (a virtualenv inside a project) is not that commit
    import subprocess
    repo = tmp_path / "repo"
    (repo / "venv").mkdir(parents=True)
    (repo / "a.txt").write_text("a")
    (repo / "venv" / "b.py").write_text("b")
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "a.txt"], ["commit", "-qm", "a"]):
        subprocess.run(git + args, check=True, capture_output=True, timeout=30)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True, timeout=30)
    assert git_info(str(repo)) == (head.stdout.strip(), "false")
    assert git_info(str(repo / "venv")) == ("unknown", "unknown")


def test_cluster_tags_single_process(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    import socket
    tags = cluster_tags(DistEnv(0, 0, 1, 1, "127.0.0.1", 1234, "single"), 1, 1)
    assert tags["world_size"] == "1" and tags["launcher"] == "single" and tags["data_parallel"] == "1"
    assert tags["hosts"] == f"{socket.gethostname()}:0" and tags["num_hosts"] == "1"
    assert tags["slurm.job_id"] == "4242" and tags["slurm.restart_count"] == "1"
    assert "slurm.array_job_id" not in tags
    assert tags["mtx_dist.git_commit"] == git_info()[0] == tags["mlflow.source.git.commit"]
    assert cluster_tags(DistEnv(0, 0, 1, 1, "127.0.0.1", 1234, "single"), 1, 1, enabled=False) == {}
    assert launcher_name("env", {"TORCHELASTIC_RUN_ID": "x"}) == "torchrun"
    assert launcher_name("env", {"CROSS_RANK": "0", "LOCAL_SIZE": "2"}) == "deepspeed"
    assert launcher_name("env", {}) == "env" and launcher_name("slurm", {"TORCHELASTIC_RUN_ID": "x"}) == "slurm"


@pytest.mark.slow
def test_job_killed_before_its_first_checkpoint_continues_its_run(tmp_path):
    """`mtx-dist train` SIGKILLed after step 3 with no checkpoint yet; the requeued `--resume latest`
    starts from step 0 but continues the same MLflow run (found through <run.dir>/mlflow_run_id)."""
    from tests.helpers import run_cli
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = ["train", "model.preset=micro", "run.steps=5", "optim.warmup_steps=2", "run.log_every=1",
           "data.demo_train_samples=128", "data.demo_val_samples=16", "data.batch_size=8", "data.workers=1",
           "run.eval_at_end=false", "run.export_at_end=false", "checkpoint.every=100", f"tracking.uri={uri}"]
    first = run_cli(job, cwd=str(tmp_path), env={"MTX_FAULTS": "kill=step:3"})
    assert first.returncode == -9, first.stderr[-3000:]
    run_id = json.loads((tmp_path / "runs/quickstart" / RUN_ID_FILE).read_text())["run_id"]
    assert not (tmp_path / "runs/quickstart/checkpoints/latest").exists()

    second = run_cli([*job, "--resume", "latest"], cwd=str(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "starting fresh" in second.stdout and f"(run {run_id};" in second.stdout
    c = client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == "0"
    # 1-5 from the requeued job, after what the killed one had delivered of its steps 1-2: metrics go
    # out on a background thread, so a SIGKILL loses those still queued (how many is timing, not tested)
    steps = sorted(m.step for m in c.get_metric_history(run_id, "train/loss"))
    killed = list(steps)
    for s in range(1, 6):
        killed.remove(s)
    assert set(killed) <= {1, 2} and len(killed) == len(set(killed)), steps
    assert len(c.search_runs([run.info.experiment_id])) == 1
    # the requeued invocation rewrote the run's description: it finished all 5 steps
    assert "Step 5 of 5." in run.data.tags["mlflow.note.content"]


def test_silent_server_costs_one_request_timeout_per_attempt(tmp_path, caplog):
    """A server that accepts connections but never answers (a listening socket nobody reads): each
    attempt ends after tracking.request_timeout_s instead of MLflow's minutes of retries."""
    import socket
    caplog.set_level(logging.WARNING, logger="mtx_dist.tracking")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t = Tracker(TrackingConfig(uri=uri, retry_s=3600.0, request_timeout_s=1), active=True,
                    run_dir=str(tmp_path))
        assert t.start("r", {}, "") is None
        t.log_metrics({"loss": 1.0}, step=1)  # within the backoff: buffered, no request
        t.finish()
    assert t._failures == 2 and t.undelivered == 1
    assert any("timed out" in m.lower() or "timeout" in m.lower() for m in warnings_of(caplog))


def test_mlflow_request_settings_are_ours_only_during_our_calls(tmp_path, monkeypatch):
    """MLflow reads its retry count and timeout from the environment: ours apply inside our client's
    calls (previous test: a silent server costs one timeout, no retries), and a process's own values
    are back after each call, nested or not, and after the run."""
    import socket
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with request_policy(6.5):  # MLflow reads whole seconds: a float would fail every request
        with request_policy(6.5):
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    with socket.socket() as silent:  # a store that never answers: every call of ours times out
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        t = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{silent.getsockname()[1]}", retry_s=3600.0,
                                   request_timeout_s=1), active=True, run_dir=str(tmp_path), background=True)
        t.start("r", {}, "")
        t.log_metrics({"loss": 1.0}, step=1)
        t.finish()
    assert t._failures >= 1
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_experiment_kind_is_set_when_we_create_it_and_kept_when_it_exists(tmp_path, store):
    """MLflow 3 opens an experiment without a kind in its GenAI view: ours are model training."""
    t = Tracker(TrackingConfig(uri=store, experiment="kind-new"), active=True, run_dir=str(tmp_path / "a"))
    t.start("r", {}, "")
    t.finish()
    assert client(store).get_experiment_by_name("kind-new").tags["mlflow.experimentKind"] == "custom_model_development"
    client(store).create_experiment("kind-mine", tags={"mlflow.experimentKind": "genai_development", "team": "x"})
    t = Tracker(TrackingConfig(uri=store, experiment="kind-mine"), active=True, run_dir=str(tmp_path / "b"))
    t.start("r", {}, "")
    t.finish()
    tags = client(store).get_experiment_by_name("kind-mine").tags
    assert tags["mlflow.experimentKind"] == "genai_development" and tags["team"] == "x"  # the user's choice stays


def _shards(folder, names, manifest=True):
    """Tiny tar files (their content does not matter to the description) with a writer-style manifest."""
    import hashlib
    os.makedirs(folder, exist_ok=True)
    entries = []
    for i, name in enumerate(names):
        data = f"shard {name}".encode() * (i + 1)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        entries.append({"name": name, "samples": 10 + i, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    if manifest:
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({"format": "mtx-dist-shards", "shards": entries}, f)
    return entries


def test_shard_set_description_from_the_manifest(tmp_path):
    from mtx_dist import shard_sets
    entries = _shards(tmp_path / "a" / "laion", ["part-000000.tar", "part-000001.tar"])
    spec = str(tmp_path / "a" / "laion" / "part-{000000..000001}.tar")
    d = shard_sets.describe(spec)
    assert (d.name, d.source, d.source_type) == ("laion/part", spec, "local")
    assert d.profile == {"shards": 2, "samples": 21, "bytes": sum(e["bytes"] for e in entries),
                         "digest_from": "manifest sha256"}
    # the same shards elsewhere give the same digest; other content gives another
    _shards(tmp_path / "b" / "laion", ["part-000000.tar", "part-000001.tar"])
    assert shard_sets.describe(str(tmp_path / "b" / "laion" / "part-{000000..000001}.tar")).digest == d.digest
    assert shard_sets.describe(str(tmp_path / "a" / "laion" / "part-000000.tar")).digest != d.digest
    # without a manifest: the spec and the shard count; the digest follows the URLs
    _shards(tmp_path / "c", ["x-000000.tar"], manifest=False)
    bare = shard_sets.describe(str(tmp_path / "c" / "x-000000.tar"))
    assert bare.profile == {"shards": 1, "digest_from": "shard URLs (no manifest)"} and len(bare.digest) == 16
    with pytest.raises(FileNotFoundError):
        shard_sets.describe(str(tmp_path / "c" / "missing-000000.tar"))


def test_datasets_and_note_reach_the_run(tmp_path, store):
    from mtx_dist import shard_sets
    _shards(tmp_path / "d", ["train-000000.tar"])
    d = shard_sets.describe(str(tmp_path / "d" / "train-000000.tar"))
    t = Tracker(TrackingConfig(uri=store, experiment="inputs"), active=True, run_dir=str(tmp_path / "run"))
    t.start("r", {}, "")
    t.log_dataset(d, "training")
    t.set_note("first")
    t.set_note("**micro** run: done")
    t.finish()
    run = client(store).get_run(t.run_id)
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest, inp.dataset.source_type) == ("d/train", d.digest, "local")
    assert json.loads(inp.dataset.source) == {"uri": d.source} and json.loads(inp.dataset.profile)["samples"] == 10
    assert {(tag.key, tag.value) for tag in inp.tags} == {("mlflow.data.context", "training")}
    assert run.data.tags["mlflow.note.content"] == "**micro** run: done"


def test_system_metrics_monitor_names_its_node_only_when_there_are_several():
    from mtx_dist.run_monitor import monitor_node_id
    assert monitor_node_id("gpu7", 0, 1, 1) is None  # one node: MLflow's plain system/ names
    assert monitor_node_id("gpu7", 3, 4, 4) == "gpu7"  # a node per host: the host names it
    # two nodes of one job on one host (a test cluster) must not write the same metric names
    assert [monitor_node_id("box", k, 2, 1) for k in (0, 1)] == ["box-node0", "box-node1"]


def test_background_tracker_on_a_dead_store_buffers_and_reports_like_the_synchronous_one(tmp_path, caplog):
    """The delivery thread keeps the guard's promises: no exception, the newest points kept, the report
    and the undelivered file at the end, and finish() returns."""
    caplog.set_level(logging.WARNING, logger="mtx_dist.tracking")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = Tracker(TrackingConfig(uri=uri, retry_s=0.0, buffer=5), active=True, run_dir=str(tmp_path / "run"),
                background=True)
    assert t.start("r", {"run.steps": 8}, "") is None
    for step in range(1, 5):
        t.log_metrics({"loss": 1.0 / step, "lr": 0.1 * step}, step=step)
    t.finish()
    assert t.run_id is None and t.delivered == 0 and t.undelivered == 8 and t.dropped == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / UNDELIVERED_FILE).read_text().splitlines()]
    assert [(r["key"], r["step"]) for r in rows] == [("lr", 2), ("loss", 3), ("lr", 3), ("loss", 4), ("lr", 4)]
    assert any("were not delivered" in m for m in warnings_of(caplog))


def test_background_tracker_survives_a_store_that_cannot_be_opened_and_delivers_once_it_can(tmp_path):
    """Building the client opens a sqlite store: with the delivery thread that happens at start, on
    the training thread, and must not raise; the run and every point arrive once the store opens."""
    blocker = tmp_path / "db"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker}/mlflow.db"
    t = Tracker(TrackingConfig(uri=uri, retry_s=0.0), active=True, run_dir=str(tmp_path / "run"), background=True)
    assert t.start("late", {"run.steps": 2}, "") is None
    t.log_metrics({"loss": 2.0}, step=1)
    blocker.unlink()
    blocker.mkdir(exist_ok=True)  # the delivery thread, retrying meanwhile, may create it first
    t.log_metrics({"loss": 1.0}, step=2)
    t.finish()
    assert t.run_id is not None and t.undelivered == 0
    assert [(m.step, m.value) for m in client(uri).get_metric_history(t.run_id, "loss")] == [(1, 2.0), (2, 1.0)]
