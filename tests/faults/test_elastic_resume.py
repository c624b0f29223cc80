"""Elastic resume: a checkpoint taken mid-epoch on one layout (data-parallel ranks x loader workers)
continues on another with every sample of the epoch seen exactly once (real gloo ranks, real shards,
the trainer's key log)."""

import json
from collections import Counter

import pytest
import torch

from mtx_dist.config import ConfigError
from tests import dist_workers as w
from tests.dist import run_ranks
from tests.data.test_streams import write_shards

pytestmark = pytest.mark.slow

SHARDS = [20] * 6  # 120 samples in 6 shards
STOP, MORE = 5, 30  # steps before the checkpoint (mid-epoch), steps after it


def _keys(paths, epoch=0):
    """Keys of one epoch in every key log, with how often each was seen."""
    seen = Counter()
    for path in paths:
        with open(path) as f:
            for rec in map(json.loads, f):
                seen.update(k for k, e in zip(rec["key"], rec["epoch"]) if e == epoch)
    return seen


def _common(tmp_path, shards):
    return ["model.preset=micro", f"data.train={shards}", f"data.val={shards}", "data.batch_size=4",
            "data.shuffle_buffer=16", "optim.warmup_steps=2",
            "run.eval_at_end=false", "run.export_at_end=false", "tracking.enabled=false", "run.log_every=1",
            f"run.dir={tmp_path}/run", f"checkpoint.every={STOP}", f"optim.decay_steps={2 * STOP + MORE}"]


def _assert_epoch_exactly_once(tmp_path, all_keys):
    logs = sorted(str(p) for p in tmp_path.glob("keys-*.jsonl"))
    seen = _keys(logs)
    assert set(seen) == set(all_keys), (len(seen), len(all_keys))
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1]


def test_two_ranks_two_workers_then_one_rank_three_workers_then_two_ranks_one_worker(tmp_path):
    """2 x 2 to the middle of the epoch, 1 x 3 a little further (still mid-epoch: its re-dealt epoch is
    itself re-dealt), then 2 x 1 past the end of the epoch."""
    shards, keys = write_shards(tmp_path / "s", "s", SHARDS)
    common = _common(tmp_path, shards)
    first = run_ranks(2, w.train_recording_keys, [*common, "data.workers=2", f"run.steps={STOP}"],
                      str(tmp_path / "keys-a{rank}.jsonl"), timeout=300)
    assert [r["step"] for r in first] == [STOP, STOP]
    assert len(_keys([tmp_path / "keys-a0.jsonl", tmp_path / "keys-a1.jsonl"])) == STOP * 8  # mid-epoch: 40 of 120

    (resumed,) = run_ranks(1, w.train_recording_keys, [*common, "data.workers=3", f"run.steps={2 * STOP}",
                                                        "checkpoint.resume=latest"],
                           str(tmp_path / "keys-b{rank}.jsonl"), timeout=300)
    assert (resumed["first_step"], resumed["step"]) == (STOP, 2 * STOP)
    assert all(x == x for x in resumed["losses"])  # finite: the weights and optimizer came back
    assert len(_keys([tmp_path / "keys-b0.jsonl"])) == STOP * 4  # 60 of 120 now

    third = run_ranks(2, w.train_recording_keys, [*common, "data.workers=1", f"run.steps={2 * STOP + MORE}",
                                                  "checkpoint.resume=latest"],
                      str(tmp_path / "keys-c{rank}.jsonl"), timeout=300)
    assert [(r["first_step"], r["step"]) for r in third] == [(2 * STOP, 2 * STOP + MORE)] * 2
    _assert_epoch_exactly_once(tmp_path, keys)


def test_one_rank_two_workers_resume_on_two_ranks_one_worker(tmp_path):
    """Under ZeRO-1, so the trainer also reshards the optimizer partitions (universal checkpoint)."""
    shards, keys = write_shards(tmp_path / "s", "s", SHARDS)
    common = [*_common(tmp_path, shards), "parallel.zero_stage=1"]
    (first,) = run_ranks(1, w.train_recording_keys, [*common, "data.workers=2", f"run.steps={STOP}"],
                         str(tmp_path / "keys-a{rank}.jsonl"), timeout=300)
    assert first["step"] == STOP
    second = run_ranks(2, w.train_recording_keys, [*common, "data.workers=1", f"run.steps={STOP + MORE}",
                                                   "checkpoint.resume=latest"],
                       str(tmp_path / "keys-b{rank}.jsonl"), timeout=300)
    assert [(r["first_step"], r["step"]) for r in second] == [(STOP, STOP + MORE)] * 2
    _assert_epoch_exactly_once(tmp_path, keys)


def _runtime(tp, dp):
    from types import SimpleNamespace
    return SimpleNamespace(groups=SimpleNamespace(tp_size=tp, dp_size=dp))


def _saved(world, dp):
    return [{"loader": {"world_size": dp}} for _ in range(world)]


ZERO1 = {"parallel": {"zero_stage": 1, "precision": "fp32"}}


@pytest.mark.parametrize("saved,config,now,overrides,needle", [
    ((2, 2), ZERO1, (1, 1), [], "it was saved with ZeRO-1 fp32, this run has ZeRO-0 fp32; keep both"),
    ((4, 2), ZERO1, (2, 1), ["parallel.zero_stage=1"], "with tensor parallelism: resharding ZeRO-1 fp32 states"),
    ((2, 1), {}, (1, 2), [], "it was saved with tensor-parallel size 2, this run has 1"),
    ((2, 2), {}, (1, 1), ["data.backend=dali"], "with data.backend = 'dali': its reader cannot re-deal an epoch"),
])
def test_what_cannot_be_resharded_is_refused_before_loading(saved, config, now, overrides, needle):
    from mtx_dist.trainer import check_layout_change
    with pytest.raises(ConfigError) as e:
        check_layout_change(w.micro_cfg(*overrides), _runtime(*now), "step00000005", _saved(*saved), config)
    assert needle in str(e.value)


def test_which_layout_changes_reshard_the_states():
    from mtx_dist.trainer import check_layout_change
    same = check_layout_change(w.micro_cfg("parallel.zero_stage=1"), _runtime(1, 2), "t", _saved(2, 2), ZERO1)
    whole = check_layout_change(w.micro_cfg(), _runtime(1, 1), "t", _saved(2, 2), {})  # ZeRO-0 fp32: replicated
    partitioned = check_layout_change(w.micro_cfg("parallel.zero_stage=1"), _runtime(1, 1), "t", _saved(2, 2), ZERO1)
    bf16 = check_layout_change(w.micro_cfg("parallel.precision=bf16"), _runtime(1, 3), "t", _saved(2, 2),
                               {"parallel": {"zero_stage": 0, "precision": "bf16"}})
    assert (same, whole, partitioned, bf16) == (False, False, True, True)


@pytest.mark.parametrize("stage", [1, 2])
def test_partitioned_states_saved_on_two_ranks_resume_exactly_on_one(tmp_path, stage):
    """ZeRO-1/2 optimizer partitions of 2 ranks, resharded for 1 through DeepSpeed's universal
    checkpoint: the weights come back bit for bit, and the next step (Adam moments, step count,
    schedule) equals the one the 2 ranks take on the same global batch."""
    layout = [f"parallel.zero_stage={stage}"]
    run_dir = str(tmp_path / "run")
    (two, _) = run_ranks(2, w.reshard_round_trip, layout, run_dir, True, timeout=300)
    (one,) = run_ranks(1, w.reshard_round_trip, layout, run_dir, False, timeout=300)
    assert not (tmp_path / "run" / "universal" / "step00000002").exists()  # the converted copy is removed
    assert two["before"].keys() == one["before"].keys()
    for k, v in two["before"].items():
        assert torch.equal(torch.from_numpy(v), torch.from_numpy(one["before"][k])), k
    for k, v in two["after"].items():  # Adam's update of a restored step is ~lr; one that lost its moments is not
        update = float(abs(v - two["before"][k]).max())
        assert float(abs(one["after"][k] - v).max()) <= 1e-3 * update, k  # the rest: summation order of 1 vs 2 ranks
