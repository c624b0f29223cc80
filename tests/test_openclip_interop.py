"""OpenCLIP interop: our open_clip export loads in open_clip.create_model (by name for ViT-B-16, through
its config for other sizes) with the same embeddings; OpenCLIP checkpoints load into our model
(model.init_from) and come back tensor for tensor, also through a training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mtx_dist.export import OPENCLIP_FILE, write_export
from mtx_dist.interop.openclip import (
    OpenClipImportError,
    from_openclip,
    load_into,
    read_checkpoint,
    to_openclip,
)
from mtx_dist.models import ContrastiveModel, get_preset
from tests.helpers import run_cli
from tests.test_export import _model

EOT, SOT = 49407, 49406


class NotData:
    """An object in a pickle: loading it would run its class's code, so it is refused."""


def _inputs(spec, n: int = 3, seed: int = 1):
    """Images, and texts of different lengths with zero padding after the end-of-text token."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, spec.vision.image_size, spec.vision.image_size, generator=g)
    ctx = spec.text.context_length
    text = torch.zeros(n, ctx, dtype=torch.long)
    for i in range(n):
        length = 3 + (i * 5) % (ctx - 3)
        text[i, 0] = SOT
        text[i, 1:length - 1] = torch.randint(1, 49000, (length - 2,), generator=g)
        text[i, length - 1] = EOT
    return image, text


def _assert_same_embeddings(oc_model, ours, spec, n: int = 3):
    """Normalized embeddings equal to 1e-5; the raw features (ln_post then @ proj; EOT pooling after
    ln_final then @ text_projection, no bias) to 1e-4 of their largest entry (~2-4 here)."""
    image, text = _inputs(spec, n)
    with torch.no_grad():
        pairs = [(oc_model.encode_image(image), ours.encode_image(image, normalize=False)),
                 (oc_model.encode_text(text), ours.encode_text(text, normalize=False))]
    for theirs, mine in pairs:
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4 * max(1.0, float(mine.abs().max())))
        torch.testing.assert_close(F.normalize(theirs, dim=-1), F.normalize(mine, dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(oc_model.logit_scale.detach(), ours.logit_scale.detach().reshape(()), rtol=0, atol=0)


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_micro_open_clip_export_loads_through_its_config(open_clip, tmp_path, siglip):
    ours = _model("micro", logit_bias=siglip)
    write_export(ours.state_dict(), ours.spec, "micro", str(tmp_path), {}, ["open_clip"])
    by_dir = open_clip.create_model(f"local-dir:{tmp_path}").eval()  # strict load inside
    _assert_same_embeddings(by_dir, ours, ours.spec)
    assert {n for n, _ in by_dir.named_buffers()} == {"attn_mask"}  # non-persistent: not in the file
    assert sorted(by_dir.state_dict()) == sorted(load_file(tmp_path / OPENCLIP_FILE))
    if siglip:
        assert torch.equal(by_dir.logit_bias.detach(), ours.logit_bias.detach().reshape(()))
    open_clip.add_model_config(str(tmp_path))  # the mtx-micro.json model config
    by_name = open_clip.create_model("mtx-micro", pretrained=str(tmp_path / OPENCLIP_FILE)).eval()
    _assert_same_embeddings(by_name, ours, ours.spec)

    # OpenCLIP's own init of that config -> ours -> OpenCLIP: every tensor identical
    torch.manual_seed(1)
    theirs = open_clip.create_model("mtx-micro", init_logit_bias=-10.0 if siglip else None).state_dict()
    mine = ContrastiveModel(ours.spec, logit_bias_init=0.0 if siglip else None)
    mine.load_state_dict(from_openclip(theirs, ours.spec), strict=True)
    back = to_openclip(mine.state_dict(), ours.spec)
    assert sorted(back) == sorted(theirs) and all(torch.equal(back[k], v) for k, v in theirs.items())


def test_vit_b16_open_clip_round_trip_and_load_by_name(open_clip, tmp_path):
    """OpenCLIP's own ViT-B-16 (its init) -> a training-style checkpoint ({'state_dict'}, 'module.'
    prefixes) -> our vit-b16 -> OpenCLIP names: every tensor identical. Our export then loads with
    open_clip.create_model('ViT-B-16', pretrained=file) and embeds like our model."""
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16").eval()
    ref_state = reference.state_dict()
    ckpt_path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in ref_state.items()}}, ckpt_path)

    spec = get_preset("vit-b16")
    with torch.device("meta"):  # every tensor is overwritten by the load: skip the init
        ours = ContrastiveModel(spec)
    ours = ours.to_empty(device="cpu").eval()
    load_into(ours, str(ckpt_path), spec, "vit-b16")
    back = to_openclip(ours.state_dict(), spec)
    assert sorted(back) == sorted(ref_state)
    for k, v in ref_state.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k
    del reference, ref_state  # equal tensors: the embeddings are compared on the export below

    out = tmp_path / "export"
    write_export(ours.state_dict(), spec, "vit-b16", str(out), {}, ["open_clip"])
    loaded = open_clip.create_model("ViT-B-16", pretrained=str(out / OPENCLIP_FILE)).eval()
    _assert_same_embeddings(loaded, ours, spec, n=1)


def test_init_from_names_what_does_not_fit(tmp_path):
    micro, tiny = get_preset("micro"), get_preset("tiny")
    tiny_file = tmp_path / "tiny.safetensors"
    save_file(to_openclip(_model("tiny").state_dict(), tiny), str(tiny_file))
    with pytest.raises(OpenClipImportError, match=r"does not fit preset 'micro' \(geometry must match\): "
                                                   r"unexpected \(48\): transformer.resblocks.2.attn.in_proj_bias, .*"
                                                   r"shape mismatch \(61\): visual.cls_token: checkpoint \(128,\), "
                                                   r"model \(64,\), visual.pos_embed: checkpoint \(65, 128\)"):
        load_into(ContrastiveModel(micro), str(tiny_file), micro, "micro")

    state = to_openclip(_model("micro", logit_bias=True).state_dict(), micro)
    state.pop("ln_final.bias")
    state["visual.head.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.bin"
    torch.save(state, partial)
    with pytest.raises(OpenClipImportError, match=r"missing \(1\): text.ln_final.bias; unexpected \(2\): "
                                                   r"logit_bias, visual.head.weight.*set loss.kind=siglip"):
        load_into(ContrastiveModel(micro), str(partial), micro, "micro")

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": NotData()}}, evil)
    with pytest.raises(OpenClipImportError, match="not a torch checkpoint that loads as data only"):
        read_checkpoint(str(evil))
    with pytest.raises(OpenClipImportError, match="no such file"):
        read_checkpoint(str(tmp_path / "nope.pt"))
    assert from_openclip({"attn_mask": torch.zeros(2, 2), "logit_scale": torch.tensor(1.0)}, micro) == \
        {"logit_scale": torch.tensor([1.0])}


@pytest.mark.slow
def test_training_continues_from_an_open_clip_checkpoint_and_exports_it_back(demo_shards, tmp_path):
    """`mtx-dist train model.init_from=<OpenCLIP checkpoint>` with a zero learning rate, then `mtx-dist
    export --format open_clip`: every tensor of the checkpoint comes back identical."""
    train, val, _ = demo_shards
    state = to_openclip(_model("micro", seed=3).state_dict(), get_preset("micro"))
    start = tmp_path / "start.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, start)
    common = ["model.preset=micro", f"data.train={train}", f"data.val={val}", "data.batch_size=8", "data.workers=0",
              "run.eval_at_end=false", "run.export_at_end=false", "tracking.enabled=false", "optim.warmup_steps=0"]
    res = run_cli(["train", *common, f"run.dir={tmp_path / 'run'}", f"model.init_from={start}", "optim.lr=0",
                   "run.steps=2"], cwd=str(tmp_path), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(["export", str(tmp_path / "run"), "--format", "open_clip", "--out", str(tmp_path / "out")],
                  cwd=str(tmp_path), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    back = load_file(tmp_path / "out" / OPENCLIP_FILE)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def test_build_model_starts_from_init_from(tmp_path):
    """engine.build_model loads model.init_from into the whole model before parallelizing; a file of
    another geometry is refused there, naming what does not fit."""
    from mtx_dist.config import load_config
    from mtx_dist.engine import Runtime, build_model
    from mtx_dist.parallel import ParallelGroups

    single = Runtime(env=None, device=torch.device("cpu"), dtype=torch.float32,
                     groups=ParallelGroups(1, 0, 1, 0, None, None))
    source = _model("micro", seed=5, logit_bias=True)
    path = tmp_path / "siglip.safetensors"
    save_file(to_openclip(source.state_dict(), source.spec), str(path))
    model = build_model(load_config(None, ["model.preset=micro", "loss.kind=siglip", f"model.init_from={path}"]),
                        single)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(OpenClipImportError, match=r"unexpected \(1\): logit_bias; the checkpoint has a logit_bias "
                                                   r"\(SigLIP\): set loss.kind=siglip"):
        build_model(load_config(None, ["model.preset=micro", f"model.init_from={path}"]), single)
    with pytest.raises(OpenClipImportError, match="does not fit preset 'tiny'.*shape mismatch"):
        build_model(load_config(None, ["model.preset=tiny", "loss.kind=siglip", f"model.init_from={path}"]), single)
