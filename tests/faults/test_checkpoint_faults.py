"""Checkpoints under faults: kill -9 inside a save, damaged and code-carrying files, a full disk, keep-K,
damaged exports. Real ``mtx-dist train`` processes (fresh interpreters, MTX_FAULTS switches) and real files."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mtx_dist import checkpoint as ckpt
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow

STEPS = 6
STATE_FILE = "mp_rank_00_model_states.pt"


def _args(run_dir, demo, *extra):
    return ["train", "model.preset=micro", "optim.warmup_steps=2", f"optim.decay_steps={STEPS}", "run.log_every=2",
            "data.demo_train_samples=256", "data.demo_val_samples=32", "data.batch_size=16", "data.workers=1",
            f"data.demo_dir={demo}", "tracking.enabled=false", "run.eval_at_end=false", "run.export_at_end=false",
            "checkpoint.every=2", f"run.steps={STEPS}", f"run.dir={run_dir}", *extra]


def _train(run_dir, demo, *extra, env=None):
    return run_cli(_args(run_dir, demo, *extra), cwd=os.path.dirname(run_dir), timeout=240, env=env)


def _tensors(tag_dir):
    """Module weights and Adam moments of a checkpoint (test-side load of our own files)."""
    saved = torch.load(os.path.join(tag_dir, STATE_FILE), map_location="cpu", weights_only=False)
    out = {f"module.{k}": v for k, v in saved["module"].items()}
    for i, s in saved["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{name}": s[name] for name in ("exp_avg", "exp_avg_sq")})
    return out


def _assert_identical(tag_dir, reference_dir):
    got, want = _tensors(tag_dir), _tensors(reference_dir)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k  # bit for bit: CPU fp32, one process


def _set_manifest_size(tag_dir, rel):
    """What someone who swaps a file and edits the manifest to match would do."""
    path = Path(tag_dir, ckpt.MANIFEST)
    manifest = json.loads(path.read_text())
    manifest["files"][rel]["size"] = os.path.getsize(os.path.join(tag_dir, rel))
    path.write_text(json.dumps(manifest))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo):
    """An uninterrupted run of 6 steps (checkpoints at 2, 4, 6): its run directory."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    res = _train(run_dir, demo)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(ckpt.checkpoint_root(run_dir))) == ["latest", "step00000002", "step00000004",
                                                                  "step00000006"]
    return run_dir


LEFT_BEHIND = {  # what a kill at each point of the step-4 save leaves besides step 2 and `latest` (-> step 2)
    "save-begin": [],
    "save-model": ["step00000004.tmp"],  # DeepSpeed's files only
    "save-state": ["step00000004.tmp"],  # + our train state, no manifest
    "save-manifest": ["step00000004.tmp"],  # complete but not renamed
    "save-rename": ["step00000004"],  # complete and renamed, `latest` not yet moved
}


@pytest.mark.parametrize("point", list(LEFT_BEHIND))
def test_kill_9_during_save_then_resume_is_exact(tmp_path, demo, reference, point):
    run_dir = str(tmp_path / "run")
    root = ckpt.checkpoint_root(run_dir)
    res = _train(run_dir, demo, env={"MTX_FAULTS": f"kill={point}:4"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert sorted(os.listdir(root)) == ["latest", "step00000002", *LEFT_BEHIND[point]]
    assert Path(root, "latest").read_text() == "step00000002"
    assert ckpt.resolve(run_dir, "latest") == "step00000002"  # the previous checkpoint still validates

    res = _train(run_dir, demo, "checkpoint.resume=latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 2" in res.stdout and f"trained to step {STEPS} of {STEPS}" in res.stdout
    assert sorted(os.listdir(root)) == ["latest", "step00000002", "step00000004", "step00000006"]  # no leftovers
    _assert_identical(os.path.join(root, "step00000006"), os.path.join(ckpt.checkpoint_root(reference),
                                                                       "step00000006"))


def _train_state(tag_dir):
    return json.loads(Path(tag_dir, "train_state-rank0.json").read_text())


def test_async_saves_write_what_sync_saves_write(tmp_path, demo, reference):
    """checkpoint.async: the same checkpoints, bit for bit in every tensor and train state, each
    committed (manifest, `latest`) although training went on while it was written."""
    run_dir = str(tmp_path / "run")
    res = _train(run_dir, demo, "checkpoint.async=true")
    assert res.returncode == 0, res.stderr[-3000:]
    root, ref_root = ckpt.checkpoint_root(run_dir), ckpt.checkpoint_root(reference)
    assert sorted(os.listdir(root)) == ["latest", "step00000002", "step00000004", "step00000006"]
    assert Path(root, "latest").read_text() == "step00000006"
    for tag in ("step00000002", "step00000004", "step00000006"):
        assert ckpt.validate(os.path.join(root, tag))["step"] == int(tag[4:])
        _assert_identical(os.path.join(root, tag), os.path.join(ref_root, tag))
        assert _train_state(os.path.join(root, tag)) == _train_state(os.path.join(ref_root, tag))


@pytest.mark.parametrize("point", ["save-write", "save-manifest"])  # in the writer thread; in rank 0's commit
def test_kill_9_during_an_async_save_then_resume_is_exact(tmp_path, demo, reference, point):
    run_dir = str(tmp_path / "run")
    root = ckpt.checkpoint_root(run_dir)
    res = _train(run_dir, demo, "checkpoint.async=true", env={"MTX_FAULTS": f"kill={point}:4"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert sorted(os.listdir(root)) == ["latest", "step00000002", "step00000004.tmp"]
    assert Path(root, "latest").read_text() == "step00000002"
    assert ckpt.resolve(run_dir, "latest") == "step00000002"

    res = _train(run_dir, demo, "checkpoint.resume=latest", "checkpoint.async=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 2" in res.stdout and f"trained to step {STEPS} of {STEPS}" in res.stdout
    assert sorted(os.listdir(root)) == ["latest", "step00000002", "step00000004", "step00000006"]
    _assert_identical(os.path.join(root, "step00000006"), os.path.join(ckpt.checkpoint_root(reference),
                                                                       "step00000006"))


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, demo, reference):
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference, run_dir)
    victim = os.path.join(ckpt.checkpoint_root(run_dir), "step00000006", STATE_FILE)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    res = _train(run_dir, demo, "checkpoint.resume=latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CheckpointWarning: skipping checkpoint step00000006: mp_rank_00_model_states.pt is not a valid " \
           "checkpoint file" in res.stderr and "(truncated or altered)" in res.stderr
    assert "step00000004 at step 4" in res.stdout and f"trained to step {STEPS} of {STEPS}" in res.stdout
    root = ckpt.checkpoint_root(run_dir)
    _assert_identical(os.path.join(root, "step00000006"), os.path.join(ckpt.checkpoint_root(reference),
                                                                       "step00000006"))
    assert ckpt.resolve(run_dir, "latest") == "step00000006"  # the damaged one was replaced by a good one


def test_altered_and_code_carrying_files_are_refused(tmp_path, demo, reference):
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference, run_dir)
    root = ckpt.checkpoint_root(run_dir)
    marker = tmp_path / "code-ran"

    # step 6: one byte of the pickle changed (same size: only the load check can tell)
    victim = os.path.join(root, "step00000006", STATE_FILE)
    with zipfile.ZipFile(victim) as z:
        pkl = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    with open(victim, "r+b") as f:
        f.seek(pkl.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(pkl.header_offset + 30 + name_len + extra_len + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(ckpt.CheckpointWarning, match="step00000006: mp_rank_00_model_states.pt is not a valid "
                                                    "checkpoint file: BadZipFile: Bad CRC-32"):
        assert ckpt.resolve(run_dir, "latest") == "step00000004"

    # step 4: the file replaced by a pickle that runs a command when unpickled, the manifest edited to match
    evil = os.path.join(root, "step00000004", STATE_FILE)
    torch.save({"module": _Payload(marker)}, evil)
    _set_manifest_size(os.path.dirname(evil), STATE_FILE)
    refused = "step00000004: mp_rank_00_model_states.pt is not a valid checkpoint file: it references posix.system"
    with pytest.raises(ckpt.CheckpointError, match=refused):
        ckpt.resolve(run_dir, "step00000004")  # an explicit tag that fails is an error, not a fallback

    class Tripwire:
        def load_checkpoint(self, *a, **k):
            raise AssertionError("DeepSpeed was handed a checkpoint that failed validation")

    with pytest.raises(ckpt.CheckpointError, match=refused):
        ckpt.load(Tripwire(), run_dir, "step00000004", 0)
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        assert ckpt.resolve(run_dir, "latest") == "step00000002"
    assert [re.match(r"skipping checkpoint (\w+):", str(w.message)).group(1) for w in caught] == [
        "step00000006", "step00000004"]

    # every checkpoint broken: the run refuses to start (and never starts from scratch over them)
    os.remove(os.path.join(root, "step00000002", ckpt.MANIFEST))
    res = _train(run_dir, demo, "checkpoint.resume=latest")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "mtx-dist train: checkpoint error: no valid checkpoint to resume from" in res.stderr
    for line in ("step00000006: mp_rank_00_model_states.pt is not a valid checkpoint file: BadZipFile",
                 refused, "step00000002: no checkpoint.json"):
        assert line in res.stderr
    assert "trained to step" not in res.stdout
    assert not marker.exists()  # nothing unpickled the payload, in this process or the CLI's
    torch.load(evil, weights_only=False)  # what DeepSpeed's own load would have done
    assert marker.exists()


def test_keep_last_k(tmp_path, demo):
    run_dir = str(tmp_path / "run")
    res = _train(run_dir, demo, "run.steps=5", "checkpoint.every=1", "checkpoint.keep=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(ckpt.checkpoint_root(run_dir))) == ["latest", "step00000004", "step00000005"]


@pytest.fixture
def small_disk(tmp_path, reference):
    """A tmpfs that holds one micro checkpoint but not two, mounted at a fresh directory."""
    one = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
              os.walk(os.path.join(ckpt.checkpoint_root(reference), "step00000002")) for f in fs)
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(3 * one // 2) >> 20}m", "tmpfs", str(mnt)],
                         capture_output=True, text=True, check=False)
    # The test machines run as root; a refused mount is a broken test environment, not a pass.
    assert res.returncode == 0, f"cannot mount a tmpfs (this test needs root): {res.stderr.strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("saves", ["sync", "async"])
def test_disk_full_during_save_fails_cleanly(small_disk, demo, saves):
    run_dir = str(small_disk / "run")
    res = _train(run_dir, demo, "run.steps=4", f"checkpoint.async={str(saves == 'async').lower()}")
    assert res.returncode == 2, res.stderr[-3000:]
    root = ckpt.checkpoint_root(run_dir)
    assert f"mtx-dist train: checkpoint error: could not write checkpoint step00000004 in {root}: No space left on " \
           "device (ENOSPC)" in res.stderr
    assert "the previous checkpoint step00000002 is untouched" in res.stderr
    assert sorted(os.listdir(root)) == ["latest", "step00000002"]  # the unfinished .tmp was removed
    assert ckpt.resolve(run_dir, "latest") == "step00000002"
    assert ckpt.validate(os.path.join(root, "step00000002"))["step"] == 2


def test_verify_export_detects_damage(tmp_path):
    from mtx_dist.export import (
        ENCODER_FILE,
        MANIFEST_FILE,
        ExportError,
        export_encoder,
        sha256_file,
        verify_export,
    )
    from mtx_dist.models import ContrastiveModel, get_preset

    out = str(tmp_path / "export")
    export_encoder(ContrastiveModel.from_preset("micro").state_dict(), get_preset("micro"), "micro", out, {})
    assert verify_export(out)["encoder"]["depth"] == 2

    encoder, manifest_path = os.path.join(out, ENCODER_FILE), Path(out, MANIFEST_FILE)
    good = Path(encoder).read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x01
    Path(encoder).write_bytes(damaged)
    with pytest.raises(ExportError, match=f"{encoder}: sha256 .* does not match"):
        verify_export(out)

    Path(encoder).write_bytes(good)
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][ENCODER_FILE]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=f"{encoder}: sha256 .* does not match {'0' * 64} in manifest.json"):
        verify_export(out)

    # a manifest that agrees with a file that is not safetensors: refused by the loader, not unpickled
    Path(encoder).write_bytes(b"not a safetensors file")
    manifest["files"][ENCODER_FILE]["sha256"] = sha256_file(encoder)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=f"{encoder}: not a readable safetensors file"):
        verify_export(out)


def test_the_save_stall_benchmark_runs_both_savers(tmp_path):
    """bench/bench_checkpoint.py on the micro preset: both savers on the production path, every async
    save committed by the ranks' agreement while training went on (its numbers live in BENCHMARKS.md)."""
    out = tmp_path / "ckpt.json"
    res = subprocess.run([sys.executable, "bench/bench_checkpoint.py", "--preset", "micro", "--precision", "fp32",
                          "--saves", "2", "--dir", str(tmp_path), "--json", str(out)], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert len(got["sync_stall_s"]) == len(got["async_stall_s"]) == 2 and got["bytes_per_save"] > 0
    assert all(n >= 1 for n in got["async_steps_to_commit"]), got
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.json"]  # its checkpoints were removed
