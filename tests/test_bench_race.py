"""The race harness's variants stay valid configurations of this build (bench/bench_race.py)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_race  # noqa: E402

from mtx_dist.config import load_config  # noqa: E402


@pytest.mark.parametrize("variant", list(bench_race.VARIANTS))
def test_every_variant_is_a_valid_config_with_its_techniques_on_and_the_rest_off(variant):
    known = bench_race.known_keys()
    assert known == {key for key, _, _ in bench_race.TECHNIQUES.values()}  # every technique exists here
    overrides = bench_race.ours_overrides(variant, known, flip=0.25, flip_tail=10, low_res=40, low_res_tail=20)
    cfg = load_config(None, [*overrides, "run.steps=200"])
    on = set(bench_race.VARIANTS[variant])
    assert cfg.data.text_trim == ("text_trim" in on) and cfg.run.compile == ("compile" in on)
    assert (cfg.model.patch_dropout, cfg.model.patch_dropout_final_steps) == ((0.25, 10) if "patch_dropout" in on
                                                                             else (0.0, 0))
    assert (cfg.model.train_image_size, cfg.model.train_image_size_final_steps) == ((40, 20) if "low_res" in on
                                                                                   else (0, 0))
