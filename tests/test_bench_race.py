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


def test_scoring_pairs_seeds_and_times_equal_steps():
    from race_score import Point, Side, merge_seeds, score_race, table

    def run(name, seed, wall, metrics):
        return Side("demo", name, seed=seed, wall_s=wall,
                    points=[Point(40 * (i + 1), wall * (i + 1) / len(metrics), "", m, m, m) for i, m in enumerate(metrics)])

    runs = [run("openclip", 0, 70.0, [0.05, 0.10]), run("ours:x", 1, 37.0, [0.07, 0.11]),  # ours' seeds listed
            run("openclip", 1, 72.0, [0.05, 0.12]), run("ours:x", 0, 35.0, [0.06, 0.11])]  # in the other order
    ref, ours = merge_seeds(runs)
    score_race([ref, ours])
    assert ours.equal_steps_ratio == pytest.approx(71.0 / 36.0, rel=1e-12)
    assert ours.paired_delta == pytest.approx(0.0, abs=1e-12)  # +0.01 and -0.01
    assert ours.paired_se == pytest.approx(0.01, rel=1e-9)  # stdev 0.01414 / sqrt(2)
    assert ours.time_to_target_s == pytest.approx(36.0, rel=1e-9)  # the mean curve reaches 0.11 at its end
    row = table([ref, ours]).splitlines()[-1]
    assert row.endswith("| 1.97 | +0.000 +- 0.010 (s.e.) |"), row

    one = [run("openclip", 0, 70.0, [0.05, 0.10]), run("ours:x", 0, 35.0, [0.06, 0.09])]
    score_race(one)
    assert one[1].paired_delta == pytest.approx(-0.01, rel=1e-9) and one[1].paired_se is None
    assert one[1].time_to_target_s is None and table(one).splitlines()[-1].endswith("| 2.00 | -0.010 |")
    other = [run("openclip", 0, 70.0, [0.05, 0.10]), run("ours:x", 1, 35.0, [0.06, 0.09])]
    score_race(other)
    assert other[1].paired_delta is None  # different seeds (initial weights): nothing to pair
