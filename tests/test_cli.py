"""The ``mtx-dist`` command as users run it: fresh interpreters, real files, real MLflow store."""

import json
import os
import re

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow

MICRO = ["model.preset=micro", "optim.warmup_steps=2", "run.log_every=2", "data.demo_train_samples=256",
         "data.demo_val_samples=32", "data.batch_size=16", "data.workers=1", "checkpoint.every=2"]


def test_train_then_resume_latest(tmp_path):
    res = run_cli(["train", *MICRO, "run.steps=4", "optim.decay_steps=6"], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained to step 4 of 4" in res.stdout
    for line in ("checkpoint: ", "export: ", "mlflow: "):
        assert line in res.stdout
    assert (tmp_path / "mlflow.db").exists()  # default store: sqlite in the working directory
    assert (tmp_path / "runs/quickstart/export/encoder.safetensors").exists()
    run_id = re.search(r"\(run ([0-9a-f]+);", res.stdout).group(1)

    res = run_cli(["train", *MICRO, "run.steps=6", "optim.decay_steps=6", "--resume", "latest"], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 4" in res.stdout and "trained to step 6 of 6" in res.stdout
    assert f"(run {run_id};" in res.stdout
    assert sorted(os.listdir(tmp_path / "runs/quickstart/checkpoints")) == [
        "latest", "step00000002", "step00000004", "step00000006"]


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    res = run_cli(["train", *MICRO, "run.steps=2", "run.eval_at_end=false", "tracking.enabled=false",
                   "--resume", "latest"], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "starting fresh" in res.stdout and "trained to step 2 of 2" in res.stdout


def test_help_config_and_shards(tmp_path):
    res = run_cli(["train", "--help-config"], cwd=str(tmp_path))
    assert res.returncode == 0 and "[optim]" in res.stdout and "warmup_steps = 30" in res.stdout
    res = run_cli(["shards", "--output", str(tmp_path / "s"), "--samples", "20", "--per-shard", "8"], cwd=str(tmp_path))
    assert res.returncode == 0 and "in 3 shards" in res.stdout
    assert sorted(os.listdir(tmp_path / "s")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                  "train.manifest.json"]


def test_quickstart_defaults_learn(tmp_path):
    """`mtx-dist train` with no arguments: the README's first command, end to end (~2 min on 2 cores)."""
    res = run_cli(["train"], cwd=str(tmp_path), timeout=550)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"held-out retrieval on (\d+) pairs \((\d+) distinct captions\): image->text recall@1 ([\d.]+), "
                  r"text->image recall@1 ([\d.]+) \(chance ([\d.]+)\)", res.stdout)
    assert m, res.stdout
    n, distinct, i2t, t2i, chance = int(m[1]), int(m[2]), float(m[3]), float(m[4]), float(m[5])
    # a few random scenes of the demo set share a caption: chance is sum(n_g^2) / N^2, a bit above 1/N
    assert n == 128 and 100 <= distinct <= 128 and 1 / 128 - 1e-3 <= chance <= 1 / 128 + 5e-3
    assert i2t > 10 * chance and t2i > 10 * chance  # far above chance


@pytest.mark.parametrize("extra,dp", [
    ((), 2),
    (("parallel.tensor_parallel=2", "parallel.zero_stage=2", "loss.kind=siglip"), 1),
], ids=["dp2", "tp2-zero2-siglip"])
def test_torchrun_two_ranks(tmp_path, extra, dp):
    """Two gloo ranks under torchrun: each data-parallel rank reads its part of the stream and saves its
    own state; with TP=2 both ranks read the same stream and the export holds full (gathered) tensors."""
    import subprocess
    import sys

    from tests.helpers import DIST_VARS, REPO
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = REPO
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mtx_dist",
                          "train", *MICRO, "run.steps=4", "tracking.enabled=false", *extra],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained to step 4 of 4" in res.stdout and "held-out retrieval on 32 pairs" in res.stdout
    tag = tmp_path / "runs/quickstart/checkpoints/step00000004"
    states = [json.loads((tag / f"train_state-rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["samples"] for s in states] == [4 * 16 * dp] * 2  # samples counted over data-parallel ranks
    assert [s["loader"]["batches"] for s in states] == [4, 4]
    assert [s["loader"]["world_size"] for s in states] == [dp, dp]
    if dp == 1:  # tensor-parallel peers consumed exactly the same stream
        assert states[0]["loader"]["positions"] == states[1]["loader"]["positions"]
    from safetensors.torch import load_file
    blocks = load_file(str(tmp_path / "runs/quickstart/export/encoder.safetensors"))
    assert blocks["0.attn.qkv.weight"].shape == (3 * 64, 64) and blocks["1.mlp.fc2.weight"].shape == (64, 256)


def test_resume_with_more_workers_goes_on_and_a_changed_stream_is_refused(tmp_path):
    no_end = ["run.eval_at_end=false", "run.export_at_end=false", "tracking.enabled=false"]
    res = run_cli(["train", *MICRO, "run.steps=2", *no_end], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(["train", *MICRO, "run.steps=4", "data.workers=2", *no_end, "--resume", "latest"], cwd=str(tmp_path))
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]  # elastic: tests/faults
    res = run_cli(["train", *MICRO, "run.steps=6", "data.workers=2", "data.batch_size=8", *no_end, "--resume",
                   "latest"], cwd=str(tmp_path))
    assert res.returncode == 2
    assert "cannot resume step00000004: loader state was saved for different shards" in res.stderr, res.stderr
    res = run_cli(["train", *MICRO, "--resume", "step00000099"], cwd=str(tmp_path))
    assert res.returncode == 2 and "'checkpoint.resume' = 'step00000099': no checkpoint" in res.stderr


def test_config_errors_come_before_torch_is_imported(tmp_path):
    """Every subcommand registers, and a bad config is reported, in an interpreter where importing
    torch fails: nothing heavy loads before the config is validated."""
    import subprocess
    import sys

    from tests.helpers import REPO
    code = ("import sys; sys.modules['torch'] = None; from mtx_dist.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    for args, rc, needle in ((["train", "model.presett=tiny"], 2, "did you mean 'model.preset'"),
                             (["train", "data.train=a::b", "data.train_weights=x"], 2, "'data.train_weights' = 'x'"),
                             (["train", "--help-config"], 0, ""), (["eval", "--help"], 0, ""),
                             (["export", "--help"], 0, "")):
        res = subprocess.run([sys.executable, "-c", code, *args], cwd=str(tmp_path), capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
        assert res.returncode == rc and needle in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def test_user_errors_are_one_line_with_exit_code_2_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    """Every subcommand's wrong input ends the same way, from one place (mtx_dist.cli + mtx_dist.errors)."""
    from mtx_dist.cli import build_parser, main

    cases = [(["train", "model.presett=tiny"], "mtx-dist train: config error: unknown config key 'model.presett'"),
             (["export", str(tmp_path), "--format", "open_clip", "--out", str(tmp_path / "o")],
              "mtx-dist export: SourceError: "),
             (["eval", str(tmp_path), "--data", str(tmp_path / "none-{0..1}.tar")], "mtx-dist eval: EvalDataError: "),
             (["launch", "--"], "mtx-dist launch: LaunchEnvError: nothing to launch"),
             (["shards", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "s")],
              "mtx-dist shards: ShardWriterError: ")]
    for argv, start in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(start) and "\n" not in err and "Traceback" not in err, (argv, err)

    from mtx_data_pipelines.dali_index import DaliIndexError
    from mtx_launchers.command import HostfileError
    from mtx_launchers.env import RendezvousError
    from mtx_dist.adapt.errors import DataError, EncoderMismatchError, WavFormatError
    from mtx_dist.checkpoint import CheckpointError
    from mtx_dist.errors import user_errors
    from mtx_dist.evaluate import EvalDataError
    from mtx_dist.export.common import ExportError
    from mtx_dist.export.source import SourceError
    from mtx_dist.interop.hf import HfConversionError
    from mtx_dist.interop.openclip import OpenClipImportError
    from mtx_dist.parallel.consolidate import CheckpointLayoutError
    from mtx_dist.parallel.groups import ParallelLayoutError
    every = (DaliIndexError, HostfileError, RendezvousError, DataError, EncoderMismatchError, WavFormatError,
             CheckpointError, EvalDataError, ExportError, SourceError, HfConversionError, OpenClipImportError,
             CheckpointLayoutError, ParallelLayoutError)
    assert all(issubclass(cls, user_errors()) for cls in every)

    args = build_parser().parse_args(["verify", str(tmp_path)])
    monkeypatch.setattr(args, "func", lambda a: {}["a bug"])
    monkeypatch.setattr("mtx_dist.cli.build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: args})())
    with pytest.raises(KeyError):
        main(["verify", str(tmp_path)])
