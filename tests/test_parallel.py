"""Tensor parallelism, distributed losses, ZeRO stages and consolidation on real gloo process groups."""

import os

import pytest
import torch

from mtx_dist.config import ConfigError, load_config
from mtx_dist.models import ContrastiveModel, get_preset
from mtx_dist.parallel import shard_tensor, tp_kind, unshard_tensor
from mtx_dist.parallel.consolidate import CheckpointLayoutError, consolidate_checkpoint
from tests import dist_workers as w
from tests.dist import run_ranks

TOL = 1e-5  # fp32, relative to the magnitude compared (at least 1)


def rel_err(got: float, want: float) -> float:
    """|got - want| relative to max(1, |want|): CLIP losses are ~2.6, SigLIP's ~11."""
    return abs(got - want) / max(1.0, abs(want))


def norms_close(ref: list[float]):
    """Gradient norms over a run: 1e-5 relative, or 1e-6 of the run's largest norm once a norm has
    fallen far below it (the trajectories differ by summation order, and that error scales with
    the gradients the run started from, not with the last, small norm)."""
    return pytest.approx(ref, rel=1e-5, abs=1e-6 * max(ref))


# -- single process ---------------------------------------------------------------------------------

def test_shard_layouts_round_trip_and_split_heads():
    model = ContrastiveModel(get_preset("micro"))
    kinds = {name: tp_kind(name) for name in model.state_dict()}
    assert kinds["visual.blocks.0.attn.qkv.weight"] == "qkv" and kinds["text.blocks.1.mlp.fc1.bias"] == "column"
    assert kinds["visual.blocks.0.attn.proj.weight"] == "row" and kinds["visual.blocks.0.attn.proj.bias"] is None
    assert kinds["visual.proj"] is None and kinds["logit_scale"] is None
    for name, full in model.state_dict().items():
        for size in (1, 2):
            parts = [shard_tensor(name, full, r, size) for r in range(size)]
            assert torch.equal(unshard_tensor(name, parts), full), name
    # qkv: rank 0 holds head 0 of q, of k and of v (micro: 2 heads of 32)
    qkv = torch.arange(3 * 64).float()
    mine = shard_tensor("visual.blocks.0.attn.qkv.bias", qkv, 0, 2)
    assert mine.tolist() == list(range(0, 32)) + list(range(64, 96)) + list(range(128, 160))


def test_tensor_parallel_size_must_divide_heads_and_widths():
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel' = 3: the vision tower's heads \(4\)"):
        load_config(None, ["parallel.tensor_parallel=3"])
    with pytest.raises(ConfigError, match=r"text tower's heads \(8\)"):
        load_config(None, ["model.preset=vit-b16", "parallel.tensor_parallel=3"])
    assert load_config(None, ["model.preset=vit-l14", "parallel.tensor_parallel=4"]).parallel.tensor_parallel == 4


# -- 2 gloo ranks -----------------------------------------------------------------------------------

pytestmark_dist = pytest.mark.slow


@pytestmark_dist
@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_tp2_forward_backward_equals_tp1(activation_checkpointing):
    r0, r1 = run_ranks(2, w.tp_forward_backward, activation_checkpointing)
    for r in (r0, r1):
        # features are unit vectors; loss and gradients relative (see tp_forward_backward)
        assert r["features"] < TOL and r["loss"] < TOL and r["grads"] < TOL, r
        assert r["trimmed_text"] <= 1e-6, r  # features are unit vectors: 1e-6 is relative to their size
        assert r["grad_names_match"]
        # 4 blocks x (qkv, proj, fc1, fc2) weights + qkv and fc1 biases are sharded
        assert r["sharded_params"] == 4 * 6
        assert r["local_numel"] < r["full_numel"]


@pytestmark_dist
@pytest.mark.parametrize("kind,gather_with_grad,local_loss", [
    ("clip", True, True), ("clip", True, False), ("siglip", True, True),
])
def test_dp2_losses_equal_the_global_batch(kind, gather_with_grad, local_loss):
    for r in run_ranks(2, w.dp_loss_grads, kind, gather_with_grad, local_loss):
        assert rel_err(r["loss"], r["ref_loss"]) < TOL, r
        # relative to the largest gradient entry (~12 here; the error ~5e-6)
        assert r["grad_err"] < TOL * max(1.0, r["grad_scale"]), r
        assert r["grad_scale"] > 1e-3  # the comparison is not between vanishing gradients


@pytestmark_dist
def test_clip_without_gather_grad_drops_part_of_the_gradient():
    # OpenCLIP's default mode: same loss, but not the global-batch gradient (why we default to gather_with_grad)
    r = run_ranks(2, w.dp_loss_grads, "clip", False, True)[0]
    assert rel_err(r["loss"], r["ref_loss"]) < TOL
    assert r["grad_err"] > 1e-4 * max(1.0, r["grad_scale"])  # ~7 of ~12 here


@pytestmark_dist
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_zero_stages_match_zero0_and_the_single_process_run(kind):
    """2 ranks, fp32, clipping active: ZeRO 1/2/3 (and ZeRO-3 with activation checkpointing) give
    ZeRO-0's losses over 10 steps, and ZeRO-0 gives those of plain torch on the global batch."""
    steps = 10
    variants = {"0": ["parallel.zero_stage=0"], "1": ["parallel.zero_stage=1"], "2": ["parallel.zero_stage=2"],
                "3": ["parallel.zero_stage=3"], "3+ac": ["parallel.zero_stage=3", "parallel.activation_checkpointing=true"]}
    results = run_ranks(2, w.engine_runs, [[*v, f"loss.kind={kind}"] for v in variants.values()], steps)[0]
    runs = dict(zip(variants, results))
    reference, ref_norms = w.reference_run([f"loss.kind={kind}"], steps, dp_size=2)
    zero0 = runs["0"]["losses"]
    assert zero0[-1] < zero0[0]
    for name in ("1", "2", "3", "3+ac"):
        assert max(rel_err(a, b) for a, b in zip(runs[name]["losses"], zero0)) < TOL, (name, runs[name], zero0)
        assert runs[name]["grad_norms"] == norms_close(ref_norms)
    assert max(rel_err(a, b) for a, b in zip(zero0, reference)) < TOL, (zero0, reference)
    assert runs["0"]["grad_norms"] == norms_close(ref_norms)
    assert max(ref_norms) > 0.5  # clipping (at 0.5) was active, so a wrong norm would change the losses


@pytestmark_dist
def test_zero3_tp2_dp2_consolidation_equals_live_weights(tmp_path):
    """4 ranks: TP=2 x DP=2 under ZeRO-3 with clipping; the offline merge of its checkpoint equals the
    weights gathered from the live engine, loads strictly into the plain model, and the run's
    losses equal the single-process run on the global batch."""
    overrides = ["parallel.tensor_parallel=2", "parallel.zero_stage=3", "parallel.stage3_param_persistence_threshold=0"]
    results = run_ranks(4, w.engine_run, overrides, 4, str(tmp_path), timeout=400)
    r0 = results[0]
    assert (r0["tp_size"], r0["dp_size"]) == (2, 2)
    assert "zero_pp_rank_1_mp_rank_01_optim_states.pt" in r0["files"]
    offline = consolidate_checkpoint(str(tmp_path / "ckpt"))
    live = r0["live"]
    assert sorted(offline) == sorted(live)
    for name in live:
        torch.testing.assert_close(offline[name], live[name], rtol=0, atol=1e-7, msg=name)
    ContrastiveModel(get_preset("micro")).load_state_dict(offline, strict=True)
    reference, ref_norms = w.reference_run(overrides, 4, dp_size=2)
    assert max(rel_err(a, b) for a, b in zip(r0["losses"], reference)) < TOL, (r0["losses"], reference)
    # DeepSpeed's norm through the mpu counts each TP shard once and replicated parameters once
    assert r0["grad_norms"] == norms_close(ref_norms)


@pytestmark_dist
def test_world_size_not_divisible_by_tensor_parallel_is_a_config_error():
    msg = run_ranks(2, w.layout_error)[0]
    assert msg == "config key 'parallel.tensor_parallel' = 4: must divide the world size (2 processes)", msg


def test_consolidation_refuses_a_directory_without_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointLayoutError, match="no DeepSpeed"):
        consolidate_checkpoint(str(tmp_path))
    (tmp_path / "mp_rank_01_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointLayoutError, match=r"ranks \[1\] are not 0..0"):
        consolidate_checkpoint(str(tmp_path))


# -- the trainer: checkpoint -> load -> continue ----------------------------------------------------

def _trainer_base(demo_shards, tmp_path, *overrides):
    train, val, _ = demo_shards
    return ["model.preset=micro", "optim.warmup_steps=2", "run.log_every=1", "checkpoint.every=100",
            f"data.train={train}", f"data.val={val}", "data.batch_size=8", "data.workers=1",
            "data.shuffle_buffer=32", "run.eval_at_end=false", "run.export_at_end=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides]


@pytestmark_dist
@pytest.mark.parametrize("overrides", [
    ("parallel.zero_stage=3",),
    ("parallel.tensor_parallel=2", "parallel.zero_stage=1"),
], ids=["zero3-dp2", "tp2-zero1"])
def test_checkpoint_load_continue_equals_uninterrupted(demo_shards, tmp_path, overrides):
    base = _trainer_base(demo_shards, tmp_path, *overrides)
    r = run_ranks(2, w.train_resume, base, str(tmp_path / "whole"), str(tmp_path / "split"), 6, 3, timeout=400)[0]
    assert r["resumed_at"] == 3
    assert len(r["whole"]) == 6 and r["first"] + r["second"] == r["whole"], r
    tags = os.listdir(tmp_path / "split" / "checkpoints")
    assert "step00000003" in tags and "step00000006" in tags
