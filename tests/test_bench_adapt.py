"""bench/bench_adapt.py end to end at micro sizes: every column of its table is produced by the
production adapters (train_adapter, predict) and the baseline, on a tiny export that carries the
pretraining's stems, so the benchmark cannot rot."""

from __future__ import annotations

import json
import sys

import torch

from tests.test_adapt_pretrained import export_with_text_tower


def test_bench_adapt_runs_every_column(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend("bench")
    sys.modules.pop("bench_adapt", None)
    import bench_adapt

    export_with_text_tower(str(tmp_path / "export"))
    threads = torch.get_num_threads()
    try:
        bench_adapt.main(["--encoder", str(tmp_path / "export"), "--modalities", "tabular,image", "--epochs", "1",
                          "--image-size", "16", "--work", str(tmp_path / "work"), "--json", str(tmp_path / "r.json"),
                          "--markdown", str(tmp_path / "r.md")])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "r.json").read_text())
    rows = {r["modality"]: r for r in result["rows"]}
    for r in rows.values():
        for kind in ("pretrained", "pretrained_random_tokenizer", "random", "baseline"):
            assert 0.0 <= r[kind] <= 1.0, (kind, r)
    assert rows["image"]["pretrained_tokenizer_init"] == "vision_stem"  # the stem column: a run of its own
    assert rows["image"]["pretrained_random_tokenizer_tokenizer_init"] == "random"
    assert "pretrained_random_tokenizer_tokenizer_init" not in rows["tabular"]  # no stem: not trained twice
    table = (tmp_path / "r.md").read_text()
    assert "| image | real: sklearn digits" in table and "| tabular | real: sklearn breast cancer" in table
