"""Text adaptation starting from the pretrained text tower's token embedding.

``mtx-dist train`` exports the OpenCLIP weights (text tower included) beside the encoder blocks; the
text tokenizer's embedding starts from them (``--text-init auto`` or ``text_tower``), through a learned
projection when the text tower's width differs from the encoder's.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from mtx_dist.adapt import AdaptConfig, AdaptError, predict, train_adapter
from mtx_dist.adapt.data import Inputs
from mtx_dist.adapt.model import load_adapter
from mtx_dist.adapt.train import IO, infer
from mtx_dist.config import TrackingConfig
from mtx_dist.export import OPENCLIP_FILE
from mtx_dist.export.writers import write_export
from mtx_dist.models import ContrastiveModel, get_preset
from tests.test_adapt import make_encoder, text_csv

NO_TRACKING = TrackingConfig(enabled=False)


def export_with_text_tower(out: str, text_width: int | None = None) -> ContrastiveModel:
    """A micro model exported as encoder blocks + OpenCLIP weights (what a training run's export holds);
    ``text_width`` makes the text tower narrower than the image encoder."""
    spec = get_preset("micro")
    if text_width:
        spec = dataclasses.replace(spec, text=dataclasses.replace(spec.text, width=text_width))
    torch.manual_seed(1)
    model = ContrastiveModel(spec)
    write_export(model.state_dict(), spec, "micro", out, {"init_seed": 1}, ("metatransformer", "open_clip"))
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(tmp_path, encoder: str, **kw) -> tuple[dict, dict]:
    text_csv(str(tmp_path / "t.csv"), 90, 0)
    cfg = AdaptConfig(encoder=encoder, modality="text", data=str(tmp_path / "t.csv"), out=str(tmp_path / "m"),
                      epochs=12, lr=3e-3, weight_decay=0.0, context_length=16, **kw)
    summary = train_adapter(cfg, NO_TRACKING, progress=False)
    return summary, json.loads((tmp_path / "m" / "adapter.json").read_text())


@pytest.mark.parametrize("text_width", [None, 32], ids=["same-width", "narrower-text-tower"])
def test_the_embedding_starts_from_the_text_tower_and_trains(tmp_path, text_width):
    pretrained = export_with_text_tower(str(tmp_path / "export"), text_width)
    summary, spec = _train(tmp_path, str(tmp_path / "export"))
    settings = spec["tokenizer"]
    assert settings["init"] == "text_tower" and settings["text_width"] == (text_width or 64)
    chance = 1 / 3
    assert summary["metrics"]["val_accuracy"] >= chance + 0.3, summary["metrics"]

    tower = pretrained.text.token_embedding.weight.detach()
    saved = load_file(str(tmp_path / "m" / "adapter.safetensors"))
    embed = saved["tokenizer.embed.weight"]
    assert embed.shape == tower.shape
    assert ("tokenizer.proj.weight" in saved) == bool(text_width)
    # Without weight decay, AdamW leaves rows that never get a gradient where they started: tokens absent
    # from the data keep the text tower's values exactly; the ones the texts use have been trained.
    used = torch.zeros(len(tower), dtype=torch.bool)
    from mtx_data_pipelines.tokenizer import ClipTokenizer

    texts = [line.split(",")[1] for line in (tmp_path / "t.csv").read_text().splitlines()[1:]]
    used[torch.from_numpy(ClipTokenizer(context_length=16)(texts)).flatten()] = True
    assert torch.equal(embed[~used], tower[~used])
    assert not torch.equal(embed[used], tower[used])

    # reloaded (the embedding now from the adapter file), it predicts as the trained model, bit for bit
    assert load_adapter(str(tmp_path / "m"))[0].tokenizer.init == "text_tower"
    r = predict(str(tmp_path / "m"), str(tmp_path / "t.csv"))
    pre = spec["preprocessing"]["input"]
    raw = IO["text"].read(str(tmp_path / "t.csv"), AdaptConfig(), labelled=False, pre=pre)
    assert torch.equal(r["outputs"], infer(summary["model"], Inputs(IO["text"], raw, pre, settings, 2**30)))


def test_random_init_ignores_the_text_tower(tmp_path):
    export_with_text_tower(str(tmp_path / "export"))
    _, spec = _train(tmp_path, str(tmp_path / "export"), text_init="random")
    assert spec["tokenizer"] == {"context_length": 16}  # the random-start layout of earlier adapters


def test_text_tower_init_without_a_text_tower_is_refused_naming_the_folder(tmp_path):
    encoder, _ = make_encoder(str(tmp_path / "blocks"))  # encoder blocks only, no OpenCLIP weights
    with pytest.raises(AdaptError, match=rf"blocks: --text-init text_tower needs .*{OPENCLIP_FILE}"):
        _train(tmp_path, encoder, text_init="text_tower")
    _, spec = _train(tmp_path, encoder)  # auto: random
    assert "init" not in spec["tokenizer"]
