"""``mtx-dist export --format hf``: a transformers CLIP folder that loads offline and computes our embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtx_dist.export.common import ExportError, verify_export
from mtx_dist.export.writers import write_export
from mtx_dist.interop.hf import HfConversionError, from_hf, spec_from_hf_config, to_hf
from mtx_dist.models import ContrastiveModel, get_preset
from tests.helpers import run_cli, torchvision_shim
from tests.data.test_tokenizer import TEXTS

import transformers  # noqa: E402 (a test dependency; a lazy module: its models import torchvision on first use)


@pytest.fixture(autouse=True, scope="module")
def _torchvision_ops():
    torchvision_shim()  # transformers' models import torchvision, whose C++ ops this CPU torch lacks


def features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x, an output object in 5.x."""
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def export(preset: str, out, seed: int = 0, **model_kwargs):
    spec = get_preset(preset)
    torch.manual_seed(seed)
    model = ContrastiveModel(spec, **model_kwargs).eval()
    with torch.no_grad():  # a trained-looking logit scale, not the init value
        model.logit_scale.fill_(3.1)
    write_export(model.state_dict(), spec, preset, str(out), {"checkpoint": "test"}, ["hf"])
    return model, spec


@pytest.mark.parametrize("preset", ["micro", "tiny", "vit-b16"])
def test_hf_clip_model_computes_our_embeddings(preset, tmp_path):
    from mtx_data_pipelines.tokenizer import ClipTokenizer
    model, spec = export(preset, tmp_path)
    verify_export(str(tmp_path), require="model.safetensors")
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
    ctx, size = spec.text.context_length, spec.vision.image_size
    captions = ["a photo of a red circle", "A blue star, on the LEFT!", "two   words", "word " * 100]
    ids = torch.from_numpy(ClipTokenizer(context_length=ctx)(captions))
    enc = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))(
        captions, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
    torch.manual_seed(1)
    image = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ours_img, ours_txt, scale, _ = model(image, ids)
        theirs_img = features(hf.get_image_features(pixel_values=image))
        theirs_txt = features(hf.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask))
    # unit vectors: 1e-5 is relative to their size (fp32, another kernel order)
    assert float((theirs_img - ours_img).abs().max()) <= 1e-5
    assert float((theirs_txt - ours_txt).abs().max()) <= 1e-5
    assert float(hf.logit_scale.detach().exp()) == pytest.approx(float(scale), rel=1e-6)
    if preset == "micro":  # the vision tower alone loads from the same folder
        vision = transformers.CLIPVisionModelWithProjection.from_pretrained(str(tmp_path)).eval()
        with torch.no_grad():
            alone = F.normalize(vision(pixel_values=image).image_embeds, dim=-1)
        assert float((alone - ours_img).abs().max()) <= 1e-5


def test_hf_tokenizer_ids_equal_ours(tmp_path):
    """HF's CLIPTokenizer on our vocabulary gives our ids. It does not run ftfy nor unescape HTML (as
    with OpenAI's own checkpoints on the Hub), so text that those change (curly quotes, mojibake,
    entities) needs that cleaning first; everything else is equal as it is."""
    import html

    import ftfy

    from mtx_data_pipelines.tokenizer import ClipTokenizer
    export("micro", tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    tok = ClipTokenizer(context_length=77)
    differ = []
    for text, row in zip(TEXTS, tok(TEXTS)):
        ours = row[: int(np.argmax(row == tok.eot_id)) + 1].tolist()  # up to our end of text (we pad with 0)
        cleaned = html.unescape(html.unescape(ftfy.fix_text(text)))
        assert hf(cleaned, truncation=True, max_length=77)["input_ids"] == ours, text
        if hf(text, truncation=True, max_length=77)["input_ids"] != ours:
            differ.append(text)
    assert differ == [t for t in TEXTS if t.startswith(("Ünïcödé", "&amp;", "mojibake"))]


def test_round_trips_are_exact(tmp_path):
    model, spec = export("micro", tmp_path)
    ours = model.state_dict()
    back = from_hf(to_hf(ours, spec), spec)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path))
    theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    spec2 = spec_from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert spec2 == spec
    again = to_hf(from_hf(theirs, spec2), spec2)
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_zero_shot_pipeline_agrees_with_ours(tmp_path):
    """HF's zero-shot pipeline (processor, tokenizer, model from the folder) ranks the classes as our
    zero-shot code does, on demo images already at the model's size."""
    from mtx_data_pipelines.demo import COLORS, render
    from mtx_data_pipelines.tokenizer import ClipTokenizer
    from mtx_data_pipelines.transforms import eval_transform
    from mtx_dist.evaluate import class_embeddings
    model, spec = export("micro", tmp_path, seed=3)
    rng = np.random.default_rng(0)
    images = [render(shape, color, "center", "large", spec.vision.image_size, rng)
              for shape, color in (("circle", "red"), ("square", "blue"), ("triangle", "green"))]
    classes = [f"{c} shape" for c in list(COLORS)[:4]]
    template = "a photo of a {}."
    tok = ClipTokenizer(context_length=spec.text.context_length)
    with torch.no_grad():
        cls = class_embeddings(lambda t: model.encode_text(t), lambda s: torch.from_numpy(tok(s)), classes, [template])
        img = F.normalize(model.encode_image(torch.from_numpy(np.stack([eval_transform(i, spec.vision.image_size)
                                                                         for i in images]))), dim=-1)
        ours = (img @ cls.t()).softmax(dim=-1)
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path), device="cpu")
    for i, image in enumerate(images):
        got = {r["label"]: r["score"] for r in pipe(image, candidate_labels=classes, hypothesis_template=template)}
        # the pipeline's softmax is over logit_scale * cosine; ours here without the scale, so compare ranks
        assert sorted(got, key=got.get, reverse=True) == [classes[j] for j in ours[i].argsort(descending=True)]


def test_siglip_model_is_refused_naming_the_difference(tmp_path):
    spec = get_preset("micro")
    model = ContrastiveModel(spec, logit_bias_init=-10.0)
    with pytest.raises(ExportError, match="logit_bias"):
        write_export(model.state_dict(), spec, "micro", str(tmp_path), {"checkpoint": "test"}, ["hf"])
    with pytest.raises(HfConversionError, match="hidden_act"):
        spec_from_hf_config({"model_type": "clip", "vision_config": {"hidden_act": "quick_gelu"}})


def test_cli_exports_a_checkpoint_as_hf(tmp_path):
    res = run_cli(["train", "model.preset=micro", "run.steps=2", "optim.warmup_steps=1", "data.batch_size=8",
                   "data.demo_train_samples=64", "data.demo_val_samples=16", "data.workers=0",
                   "run.eval_at_end=false", "run.export_at_end=false", "tracking.enabled=false"], str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli(["export", "runs/quickstart", "--format", "hf,open_clip", "--out", "hf"], str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = verify_export(str(tmp_path / "hf"), require="model.safetensors")
    assert manifest["formats"] == ["open_clip", "hf"] and "config.json" in manifest["files"]
    assert transformers.CLIPModel.from_pretrained(str(tmp_path / "hf")).config.projection_dim == 64


def test_init_from_an_hf_folder_continues_from_its_weights(tmp_path):
    """``model.init_from`` takes a transformers CLIPModel folder (here saved by transformers itself from
    our export): the model starts from exactly its weights; another geometry is refused by name."""
    from mtx_dist.interop.openclip import OpenClipImportError, load_into
    model, spec = export("micro", tmp_path / "ours")
    transformers.CLIPModel.from_pretrained(str(tmp_path / "ours")).save_pretrained(str(tmp_path / "saved"))
    fresh = ContrastiveModel(spec)
    load_into(fresh, str(tmp_path / "saved"), spec, "micro")
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(OpenClipImportError, match="vision image_size is 32, the preset's 64"):
        load_into(ContrastiveModel(get_preset("tiny")), str(tmp_path / "saved"), get_preset("tiny"), "tiny")


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_timm_folder_gives_our_image_embeddings_and_a_fresh_head_trains(timm, preset, tmp_path):
    spec = get_preset(preset)
    torch.manual_seed(0)
    model = ContrastiveModel(spec).eval()
    write_export(model.state_dict(), spec, preset, str(tmp_path), {"checkpoint": "test"}, ["timm", "metatransformer"])
    verify_export(str(tmp_path))
    vit = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    image = torch.randn(3, 3, spec.vision.image_size, spec.vision.image_size)
    with torch.no_grad():
        ours, theirs = model.encode_image(image, normalize=False), vit(image)
    # unnormalized embeddings: the bound is relative to their largest entry
    assert float((theirs - ours).abs().max()) <= 1e-5 * float(ours.abs().max())
    assert timm.data.resolve_data_config({}, model=vit)["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    # a classifier: the encoder's weights, a fresh 5-way head, and one optimizer step that lowers the loss
    clf = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=5)
    assert clf.head.out_features == 5 and torch.equal(clf.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    labels = torch.tensor([0, 3, 4])
    opt = torch.optim.SGD(clf.head.parameters(), lr=1e-3)
    before = F.cross_entropy(clf(image), labels)
    before.backward()
    opt.step()
    assert float(F.cross_entropy(clf(image), labels).detach()) < float(before.detach())


def test_hf_and_timm_in_one_folder_are_refused(tmp_path):
    spec = get_preset("micro")
    with pytest.raises(ExportError, match="separate folders"):
        write_export(ContrastiveModel(spec).state_dict(), spec, "micro", str(tmp_path), {}, ["hf", "timm"])


def test_import_cli_turns_an_hf_folder_into_our_export(tmp_path):
    from safetensors.torch import load_file
    model, spec = export("micro", tmp_path / "ours")
    transformers.CLIPModel.from_pretrained(str(tmp_path / "ours")).save_pretrained(str(tmp_path / "saved"))
    res = run_cli(["import", str(tmp_path / "saved"), "--out", str(tmp_path / "imported")], str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "as preset micro" in res.stdout and "model.init_from=" in res.stdout
    manifest = verify_export(str(tmp_path / "imported"))
    assert manifest["formats"] == ["metatransformer", "open_clip"] and manifest["preset"] == "micro"
    blocks = load_file(str(tmp_path / "imported" / "encoder.safetensors"))
    want = {k.removeprefix("visual.blocks."): v for k, v in model.state_dict().items() if k.startswith("visual.blocks.")}
    assert blocks.keys() == want.keys() and all(torch.equal(blocks[k], want[k]) for k in want)
    res = run_cli(["import", str(tmp_path / "ours" / "README.md"), "--out", str(tmp_path / "x")], str(tmp_path))
    assert res.returncode == 2 and "not a transformers model folder" in res.stderr
