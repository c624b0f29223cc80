"""End-to-end training on the DeepSpeed engine (world size 1, CPU, gloo), in process."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mtx_dist import checkpoint as ckpt
from mtx_dist.config import load_config
from mtx_dist.export import sha256_file
from mtx_dist.models import get_preset
from mtx_dist.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo"))


def micro(tmp_path, demo_dir, *overrides, run="run"):
    return load_config(None, [
        f"run.dir={tmp_path}/{run}", "model.preset=micro", "run.steps=8", "optim.warmup_steps=2",
        "run.log_every=1", "checkpoint.every=4", f"data.demo_dir={demo_dir}", "data.demo_train_samples=256",
        "data.demo_val_samples=32", "data.batch_size=16", "data.workers=1", "data.shuffle_buffer=64",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides,
    ])


def _mlflow_client(tmp_path):
    from mlflow.tracking import MlflowClient
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def _module_state(tag_dir):
    return torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)


def test_train_checkpoints_exports_and_tracks(tmp_path, demo_dir):
    cfg = micro(tmp_path, demo_dir)
    result = train(cfg)
    assert result.step == 8 and len(result.losses) == 8 and all(map(torch.isfinite, torch.tensor(result.losses)))

    root = ckpt.checkpoint_root(cfg.run.dir)
    assert open(os.path.join(root, "latest")).read() == "step00000008"
    assert sorted(os.listdir(root)) == ["latest", "step00000004", "step00000008"]
    state = json.load(open(os.path.join(root, "step00000008", "train_state-rank0.json")))
    assert state["step"] == 8 and state["samples"] == 8 * 16 and state["loader"]["batches"] == 8

    # export = the image blocks of the final weights, renamed N.x, with a manifest that checks out
    exported = load_file(os.path.join(result.export_dir, "encoder.safetensors"))
    weights = _module_state(result.checkpoint)["module"]
    depth = 2  # micro preset
    assert set(exported) == {k[len("visual.blocks."):] for k in weights if k.startswith("visual.blocks.")}
    assert {f"{i}.{n}" for i in range(depth) for n in ("norm1.weight", "attn.qkv.weight", "mlp.fc2.bias")} <= set(exported)
    for k, v in exported.items():
        assert torch.equal(v, weights[f"visual.blocks.{k}"])
    manifest = json.load(open(os.path.join(result.export_dir, "manifest.json")))
    assert manifest["encoder"]["depth"] == depth and manifest["source"]["step"] == 8
    assert manifest["files"]["encoder.safetensors"]["sha256"] == sha256_file(
        os.path.join(result.export_dir, "encoder.safetensors"))

    # MLflow: params, per-step metrics, held-out recall, the config and the export as artifacts
    client = _mlflow_client(tmp_path)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.preset"] == "micro" and run.data.params["run.steps"] == "8"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 9))
    assert [m.value for m in history] == pytest.approx(result.losses, rel=1e-6)
    for key in ("train/lr", "train/logit_scale", "train/grad_norm", "train/skipped_steps", "train/samples",
                "perf/samples_per_s", "perf/samples_per_s_per_device", "perf/tflops_per_device", "perf/data_wait_frac",
                "val/i2t_recall_at_1", "val/t2i_recall_at_1", "val/distinct_captions", "val/chance_recall_at_1"):
        assert key in run.data.metrics, key
    assert "perf/mfu" not in run.data.metrics  # no peak is known for a CPU
    assert not [k for k in run.data.metrics if k.startswith("data/")]  # clean data: no skip counters at all
    assert not [k for k in run.data.metrics if "/" not in k]  # every name has its section
    m = run.data.metrics
    from mtx_dist.flops import train_flops_per_sample
    assert m["perf/tflops_per_device"] == pytest.approx(
        m["perf/samples_per_s_per_device"] * train_flops_per_sample(get_preset("micro")) / 1e12, rel=1e-6)
    assert run.data.metrics["val/i2t_recall_at_1"] == result.eval["i2t_recall_at_1"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "export"} <= artifacts


def test_resume_continues_exactly(tmp_path, demo_dir):
    """4 steps, stop, --resume latest to 8 == 8 uninterrupted steps (same losses, bit for bit), with text
    trimming (the default), FLIP patch dropout and low-resolution training on (no tails: they count from
    each invocation's run.steps)."""
    speed = ("data.text_trim=true", "model.patch_dropout=0.5", "model.train_image_size=24")
    whole = train(micro(tmp_path, demo_dir, "optim.decay_steps=8", "run.eval_at_end=false",
                        "run.export_at_end=false", *speed, run="whole"))
    first = train(micro(tmp_path, demo_dir, "optim.decay_steps=8", "run.steps=4", "run.eval_at_end=false",
                        "run.export_at_end=false", *speed, run="split"))
    resumed_cfg = micro(tmp_path, demo_dir, "optim.decay_steps=8", "checkpoint.resume=latest",
                        "run.eval_at_end=false", "run.export_at_end=false", *speed, run="split")

    # model + optimizer state right after resume equal what was saved at step 4
    from mtx_dist.engine import build_engine, setup_runtime
    from mtx_dist.models import ContrastiveModel
    runtime = setup_runtime(resumed_cfg)
    engine = build_engine(resumed_cfg, ContrastiveModel.from_preset("micro"), runtime)
    state = ckpt.load(engine, resumed_cfg.run.dir, "step00000004", 0)
    saved = _module_state(os.path.join(ckpt.checkpoint_root(resumed_cfg.run.dir), "step00000004"))
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, saved["module"][k]), k
    live_opt, saved_opt = engine.optimizer.state_dict(), saved["optimizer"]
    assert live_opt["state"].keys() == saved_opt["state"].keys() and len(live_opt["state"]) > 0
    for i, s in live_opt["state"].items():
        assert int(s["step"]) == 4
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[name], saved_opt["state"][i][name])
    assert state.step == 4 and engine.lr_scheduler.last_epoch == 4

    second = train(resumed_cfg)
    assert second.first_step == 4 and second.step == 8
    assert first.losses + second.losses == whole.losses  # bit-identical on CPU fp32

    client = _mlflow_client(tmp_path)
    assert second.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    history = client.get_metric_history(first.mlflow_run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 9))
    lr_split = [m.value for m in client.get_metric_history(first.mlflow_run_id, "train/lr")]
    lr_whole = [m.value for m in client.get_metric_history(whole.mlflow_run_id, "train/lr")]
    assert lr_split == lr_whole  # the schedule continues where it stopped


def test_zero3_bf16_trains_and_exports(tmp_path, demo_dir):
    result = train(micro(tmp_path, demo_dir, "parallel.zero_stage=3", "parallel.precision=bf16", "run.steps=3",
                         "checkpoint.every=3", "run.eval_at_end=false"))
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    exported = load_file(os.path.join(result.export_dir, "encoder.safetensors"))
    assert exported["0.attn.qkv.weight"].shape == (192, 64)  # gathered from ZeRO-3 partitions, not a shard
