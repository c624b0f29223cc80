"""checkpoint.verify=full: a flipped byte inside tensor data (same size, a valid zip and pickle) is
caught at resume, which falls back to the previous checkpoint naming the file; `mtx-dist verify`
reports it. With sizes only it goes unnoticed: what the full mode is for."""

from __future__ import annotations

import json
import struct
import zipfile

import pytest

from mtx_dist import checkpoint as ckpt
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def flip_a_byte_inside_tensor_data(path) -> str:
    """Flip one byte in the middle of the largest tensor record of a torch zip file; returns the record."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    return info.filename


def test_full_hashes_catch_a_flipped_byte_and_resume_falls_back(demo_shards, tmp_path):
    train, val, _ = demo_shards
    run = tmp_path / "run"
    base = ["model.preset=micro", "optim.warmup_steps=1", f"data.train={train}", f"data.val={val}",
            "data.batch_size=8", "data.workers=0", "run.eval_at_end=false", "run.export_at_end=false",
            "tracking.enabled=false", f"run.dir={run}", "checkpoint.every=2", "checkpoint.verify=full"]
    res = run_cli(["train", *base, "run.steps=4"], cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    step2, step4 = (run / "checkpoints" / ckpt.tag_for(s) for s in (2, 4))
    manifest = json.loads((step4 / ckpt.MANIFEST).read_text())
    assert all("sha256" in meta for meta in manifest["files"].values())  # big files too
    biggest = max(manifest["files"], key=lambda rel: manifest["files"][rel]["size"])
    assert biggest.endswith(".pt")  # DeepSpeed's model or optimizer states

    record = flip_a_byte_inside_tensor_data(step4 / biggest)
    assert record.endswith(tuple("0123456789"))
    ckpt.validate(str(step4))  # sizes, small files' hashes, pickles: all still fine
    with pytest.raises(ckpt.CheckpointError, match=f"{biggest} is not a valid checkpoint file: its sha256 differs"):
        ckpt.validate(str(step4), full=True)

    res = run_cli(["verify", str(run)], cwd=str(tmp_path), timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert any(ln.startswith(f"ok   checkpoint {step2}") for ln in lines), res.stdout
    assert any(ln.startswith(f"BAD  checkpoint {step4}") and biggest in ln for ln in lines), res.stdout

    res = run_cli(["train", *base, "run.steps=6", "checkpoint.resume=latest"], cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipping checkpoint {ckpt.tag_for(4)}: {biggest}" in res.stderr and "sha256 differs" in res.stderr
    assert "resumed from" in res.stdout + res.stderr and "at step 2" in res.stdout + res.stderr
    assert json.loads((run / "checkpoints" / ckpt.tag_for(6) / "train_state-rank0.json").read_text())["step"] == 6

    res = run_cli(["verify", str(run / "checkpoints" / ckpt.tag_for(6))], cwd=str(tmp_path), timeout=120)
    assert res.returncode == 0 and "sha256 of" in res.stdout, res.stdout + res.stderr
