"""Tokenizers that start from the pretraining's own input layers (mtx_dist.adapt.pretrained).

``mtx-dist train`` exports the whole OpenCLIP model beside the encoder blocks. The text tokenizer's
embedding starts from the text tower's (through a learned projection when its width differs from the
encoder's); the image-like tokenizers start from the image tower's stem, so that on the first step
they give the frozen blocks exactly the tokens the pretraining gave them.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

import pytest
import torch
from safetensors.torch import load_file

from mtx_dist.adapt import AdaptConfig, AdaptError, build_tokenizer, predict, train_adapter
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
    _, spec = _train(tmp_path, str(tmp_path / "export"), tokenizer_init="random")
    assert spec["tokenizer"] == {"context_length": 16}  # the random-start layout of earlier adapters


def test_text_tower_init_without_a_text_tower_is_refused_naming_the_folder(tmp_path):
    encoder, _ = make_encoder(str(tmp_path / "blocks"))  # encoder blocks only, no OpenCLIP weights
    with pytest.raises(AdaptError, match=rf"blocks: --tokenizer-init pretrained needs .*{OPENCLIP_FILE}"):
        _train(tmp_path, encoder, tokenizer_init="pretrained")
    _, spec = _train(tmp_path, encoder)  # auto: random
    assert "init" not in spec["tokenizer"]


def _stem_tokenizer(export: str, modality: str, grey: np.ndarray | None = None, **kw):
    """The tokenizer ``fit`` and ``initialise`` make for ``modality`` on ``export`` before training, and
    the input normalisation ``fit`` chose (grey images: their own mean and std, from ``grey``)."""
    cfg = AdaptConfig(encoder=export, modality=modality, **kw)
    manifest = json.loads(open(f"{export}/manifest.json").read())
    io = IO[modality]

    class Data:  # fit reads only the geometry here (and the grey pixels' statistics)
        items = list(grey) if grey is not None else [np.zeros((4, 4), np.float32)]
    pre, settings = io.fit(Data, range(len(Data.items)), cfg, manifest)
    tok = build_tokenizer(modality, 64, settings)
    io.initialise(tok, export, settings, pre, manifest)
    return tok, settings, pre


@pytest.mark.parametrize("size", [32, 16], ids=["pretrained-size", "resampled-positions"])
def test_image_like_tokenizers_start_as_the_pretrained_stem(tmp_path, size):
    """image: the adapter's tokens equal the vision tower's ln_pre(tokens); xray/infrared: a grey image,
    normalised with its own statistics, gives the tokens of the same image as three equal channels
    under the pretraining's normalisation; video: a still clip's tokens equal the image's, slot by slot."""
    model = export_with_text_tower(str(tmp_path / "export"))
    vis = model.visual.eval()
    clip_mean = torch.tensor(model_preprocessing(tmp_path)["mean"]).view(1, 3, 1, 1)
    clip_std = torch.tensor(model_preprocessing(tmp_path)["std"]).view(1, 3, 1, 1)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        want = vis.ln_pre(vis.tokens(x))
        tok, settings, _ = _stem_tokenizer(str(tmp_path / "export"), "image", image_size=size)
        assert settings["init"] == "vision_stem"
        torch.testing.assert_close(tok(x), want, rtol=0, atol=1e-5)

        g = torch.rand(3, 1, size, size) ** 2  # raw grey pixels in 0..1, far from the pretraining's mean
        tok, settings, pre = _stem_tokenizer(str(tmp_path / "export"), "xray", grey=g[:, 0].numpy(), image_size=size)
        assert settings["init"] == "vision_stem" and settings["channels"] == 1
        z = (g - pre["mean"]) / pre["std"]  # what the adapter's transform feeds it
        as_rgb = (g.expand(-1, 3, -1, -1) - clip_mean) / clip_std  # what the pretraining fed the stem
        got, ref = tok(z), vis.ln_pre(vis.tokens(as_rgb))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)

        tok, settings, _ = _stem_tokenizer(str(tmp_path / "export"), "video", image_size=size, frames=4, tubelet=2)
        clip = x[:, :, None].expand(-1, -1, 4, -1, -1)  # (N, 3, frames, S, S), every frame the image
        got = tok(clip)
        grid = (size // 8) ** 2
        assert got.shape[1] == 1 + 2 * grid
        torch.testing.assert_close(got[:, 0], want[:, 0], rtol=0, atol=1e-5)
        for slot in range(2):
            torch.testing.assert_close(got[:, 1 + slot * grid:1 + (slot + 1) * grid], want[:, 1:], rtol=0, atol=1e-5)


def model_preprocessing(tmp_path) -> dict:
    return json.loads((tmp_path / "export" / "manifest.json").read_text())["preprocessing"]


def test_a_patch_size_unlike_the_pretrained_one_starts_random_or_is_refused(tmp_path):
    export_with_text_tower(str(tmp_path / "export"))
    _, settings, _ = _stem_tokenizer(str(tmp_path / "export"), "image", patch=4)
    assert "init" not in settings
    with pytest.raises(AdaptError, match="--patch 4 differs from the pretrained patch embedding's 8"):
        _stem_tokenizer(str(tmp_path / "export"), "image", patch=4, tokenizer_init="pretrained")
    _, settings, _ = _stem_tokenizer(str(tmp_path / "export"), "image", tokenizer_init="random")
    assert "init" not in settings


def test_an_image_adapter_from_the_stem_trains_saves_and_predicts_as_trained(tmp_path):
    from tests.test_adapt import image_dir

    export_with_text_tower(str(tmp_path / "export"))
    image_dir(str(tmp_path / "images"), 24, 0)
    cfg = AdaptConfig(encoder=str(tmp_path / "export"), modality="image", data=str(tmp_path / "images"),
                      out=str(tmp_path / "m"), epochs=2, lr=3e-3)
    summary = train_adapter(cfg, NO_TRACKING, progress=False)
    spec = json.loads((tmp_path / "m" / "adapter.json").read_text())
    assert spec["tokenizer"]["init"] == "vision_stem"
    assert load_adapter(str(tmp_path / "m"))[0].tokenizer.init == "vision_stem"
    r = predict(str(tmp_path / "m"), str(tmp_path / "images"))
    pre, settings = spec["preprocessing"]["input"], spec["tokenizer"]
    raw = IO["image"].read(str(tmp_path / "images"), AdaptConfig(), labelled=False, pre=pre)
    assert torch.equal(r["outputs"], infer(summary["model"], Inputs(IO["image"], raw, pre, settings, 2**30)))
