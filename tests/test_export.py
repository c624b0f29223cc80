"""Export: Meta-Transformer blocks (strict timm load, same features), determinism, bf16, manifests,
and exports of ZeRO-3 and TP=2 checkpoints equal to the export of the live, gathered model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mtx_dist.cli import main
from mtx_dist.config import load_config
from mtx_dist.export import (
    ENCODER_FILE,
    ENCODER_PTH,
    MANIFEST_FILE,
    OPENCLIP_FILE,
    ExportError,
    export_encoder,
    verify_export,
    write_export,
)
from mtx_dist.models import ContrastiveModel, get_preset
from tests.dist import run_ranks
from tests.helpers import run_cli


def _model(preset: str = "micro", seed: int = 0, logit_bias: bool = False) -> ContrastiveModel:
    """A model whose every tensor is random (norm gains and biases too), so a mix-up shows."""
    torch.manual_seed(seed)
    model = ContrastiveModel(get_preset(preset), logit_bias_init=0.0 if logit_bias else None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _files(d) -> dict[str, bytes]:
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


@pytest.mark.parametrize("preset", ["micro", "vit-b16"])
def test_metatransformer_export_loads_strictly_into_timm_blocks_with_equal_features(timm, tmp_path, preset):
    """Meta-Transformer's own construction loads both files with strict=True and computes our blocks'
    features to 1e-6 (fp32); our LayerNorm eps equals that construction's (nn.LayerNorm: 1e-5)."""
    model = _model(preset)
    v = model.spec.vision
    export_encoder(model.state_dict(), model.spec, preset, str(tmp_path), {"run_dir": None})
    manifest = verify_export(str(tmp_path))
    assert manifest["encoder"] == {"width": v.width, "depth": v.layers, "heads": v.heads, "mlp_ratio": 4.0,
                                   "qkv_bias": True, "act": "gelu", "norm": "layernorm", "norm_eps": 1e-5,
                                   "patch_size": v.patch_size, "image_size": v.image_size,
                                   "embed_dim": model.spec.embed_dim}
    assert manifest["files"][ENCODER_PTH]["tensors"] == manifest["files"][ENCODER_FILE]["tensors"] == 12 * v.layers

    Block = timm.models.vision_transformer.Block
    reference = torch.nn.Sequential(*[Block(v.width, v.heads, mlp_ratio=4., qkv_bias=True, norm_layer=torch.nn.LayerNorm,
                                            act_layer=torch.nn.GELU) for _ in range(v.layers)]).eval()
    ours_eps = {m.eps for m in model.visual.blocks.modules() if isinstance(m, torch.nn.LayerNorm)}
    ref_eps = {m.eps for m in reference.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert ours_eps == ref_eps == {1e-5}

    x = torch.randn(2, v.tokens, v.width)
    with torch.no_grad():
        expected = x
        for blk in model.visual.blocks:
            expected = blk(expected)
        for state in (torch.load(tmp_path / ENCODER_PTH, weights_only=True), load_file(tmp_path / ENCODER_FILE)):
            assert type(state) is dict
            reference.load_state_dict(state, strict=True)
            # relative to the features' magnitude (~4 for micro, ~7 for vit-b16's 12 blocks): fp32,
            # another implementation's summation order
            torch.testing.assert_close(reference(x), expected, rtol=0,
                                       atol=1e-6 * max(1.0, float(expected.abs().max())))


def test_export_twice_is_byte_identical_and_bf16_is_the_rounded_fp32(tmp_path):
    model = _model(logit_bias=True)  # a SigLIP model: its logit_bias goes into the OpenCLIP file
    source = {"run_dir": "/runs/a", "checkpoint": "step00000008", "step": 8}
    a, b, c = (str(tmp_path / n) for n in "abc")
    for d in (a, b):
        write_export(model.state_dict(), model.spec, "micro", d, source, ["open_clip", "metatransformer"])
    first, second = _files(a), _files(b)
    assert sorted(first) == sorted([ENCODER_FILE, ENCODER_PTH, MANIFEST_FILE, OPENCLIP_FILE, "open_clip_config.json",
                                    "mtx-micro.json", "README.md"])
    assert first == second  # no clock, no paths, fixed tensor order: the same bytes

    write_export(model.state_dict(), model.spec, "micro", c, source, ["metatransformer", "open_clip"], torch.bfloat16)
    manifest = verify_export(c)
    assert manifest["dtype"] == "bfloat16" and manifest["formats"] == ["metatransformer", "open_clip"]
    assert manifest["source"] == source
    for name in (ENCODER_FILE, OPENCLIP_FILE):
        full, half = load_file(os.path.join(a, name)), load_file(os.path.join(c, name))
        assert list(full) == list(half)
        for k in full:
            assert half[k].dtype == torch.bfloat16 and torch.equal(half[k], full[k].to(torch.bfloat16)), k
    oc = load_file(os.path.join(a, OPENCLIP_FILE))
    assert oc["logit_scale"].shape == () and oc["logit_bias"].shape == ()
    assert torch.equal(oc["logit_bias"], model.logit_bias.detach().reshape(()))


def test_verify_export_requires_the_file_its_reader_needs(tmp_path):
    model = _model()
    write_export(model.state_dict(), model.spec, "micro", str(tmp_path), {}, ["open_clip"])
    assert verify_export(str(tmp_path), require=OPENCLIP_FILE)["format"] == "open_clip"
    with pytest.raises(ExportError, match=r"this export \(open_clip\) has no encoder.safetensors; export the "
                                          r"checkpoint with --format metatransformer"):
        verify_export(str(tmp_path))
    with pytest.raises(ExportError, match="export format"):
        write_export(model.state_dict(), model.spec, "micro", str(tmp_path), {}, ["onnx"])


# -- from checkpoints of distributed runs -----------------------------------------------------------

def train_runs(base: list[str], runs: dict[str, list[str]]) -> dict[str, str]:
    """Run on every rank: train each configuration in turn (same processes); their export directories."""
    from mtx_dist.config import load_config
    from mtx_dist.trainer import train

    return {name: train(load_config(None, [*base, *overrides])).export_dir for name, overrides in runs.items()}


@pytest.mark.slow
def test_exports_of_zero3_and_tp2_checkpoints_equal_the_live_gathered_model(demo_shards, tmp_path, capsys):
    """2 gloo ranks train the micro model under ZeRO-3 (DP=2) and with TP=2; the trainer exports the
    weights gathered from the live engine. `mtx-dist export` of each run's checkpoint (consolidated
    offline) writes the same bytes, twice in separate processes, and its OpenCLIP file holds the same
    image blocks; the checkpoint carries the run's config."""
    train, val, _ = demo_shards
    base = ["model.preset=micro", "run.steps=3", "optim.warmup_steps=1", "checkpoint.every=100", f"data.train={train}",
            f"data.val={val}", "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=32", "run.eval_at_end=false",
            "tracking.enabled=false"]
    runs = {"zero3": ["parallel.zero_stage=3", "parallel.stage3_param_persistence_threshold=0"],
            "tp2": ["parallel.tensor_parallel=2", "parallel.zero_stage=1"]}
    runs = {name: [*o, f"run.dir={tmp_path / name}"] for name, o in runs.items()}
    live_exports = run_ranks(2, train_runs, base, runs, timeout=400)[0]
    for name in runs:
        run_dir = tmp_path / name
        tag_dir = run_dir / "checkpoints" / "step00000003"
        listed = json.loads((tag_dir / "checkpoint.json").read_text())["files"]
        saved = load_config(str(tag_dir / "config.toml"))  # listed, hence hashed and validated with the rest
        assert "config.toml" in listed and saved.model.preset == "micro"
        assert (saved.parallel.zero_stage, saved.parallel.tensor_parallel) == ((3, 1) if name == "zero3" else (1, 2))

        # zero3: the run directory, then the checkpoint itself, in two processes; tp2: once
        outs = [tmp_path / f"{name}-{i}" for i in range(2 if name == "zero3" else 1)]
        for out, src in zip(outs, (run_dir, tag_dir)):
            args = ["export", str(src), "--format", "metatransformer,open_clip", "--out", str(out)]
            if name == "zero3":
                res = run_cli(args, cwd=str(tmp_path), timeout=180)
                assert res.returncode == 0, res.stderr[-3000:]
                stdout = res.stdout
            else:  # in this process (the same code, without an interpreter start)
                capsys.readouterr()
                assert main(args) == 0
                stdout = capsys.readouterr().out
            assert "exported micro (metatransformer, open_clip, fp32) from step00000003 (step 3)" in stdout
        assert all(_files(out) == _files(outs[0]) for out in outs)
        live = live_exports[name]
        for f in (ENCODER_FILE, ENCODER_PTH):
            assert _files(outs[0])[f] == _files(live)[f], (name, f)
        manifest = verify_export(str(outs[0]))
        assert manifest["source"]["checkpoint"] == "step00000003" and manifest["source"]["step"] == 3
        assert manifest["source"]["run_dir"] == str(run_dir) and manifest["source"]["world_size"] == 2
        blocks = load_file(os.path.join(live, ENCODER_FILE))
        oc = load_file(os.path.join(outs[0], OPENCLIP_FILE))
        assert torch.equal(oc["visual.transformer.resblocks.1.attn.in_proj_weight"], blocks["1.attn.qkv.weight"])
        assert torch.equal(oc["visual.transformer.resblocks.0.mlp.c_proj.weight"], blocks["0.mlp.fc2.weight"])


def test_every_export_has_a_model_card(tmp_path):
    """README.md: geometry, what it was trained on, held-out metrics when the run measured them, and how
    to load each format of the folder; listed with its hash in the manifest."""
    model = _model()
    source = {"run_dir": "/runs/a", "checkpoint": "step00000008", "step": 8, "samples": 512,
              "data": "shards/train-{0000..0009}.tar", "held_out": {"i2t_recall_at_1": 0.25, "n": 128}}
    write_export(model.state_dict(), model.spec, "micro", str(tmp_path / "a"), source, ["metatransformer", "open_clip"])
    card = (tmp_path / "a" / "README.md").read_text()
    for want in ("`micro`", "| image | 64 | 2 | 2 | 4.0 | 32 px, patch 8 |", "- step: 8", "- samples seen: 512",
                 "- training data: shards/train-{0000..0009}.tar", "- i2t_recall_at_1: 0.2500", "- n: 128",
                 "### Meta-Transformer (timm blocks)", "Block(64, 2, mlp_ratio=4.0", "### OpenCLIP",
                 "create_model('local-dir:DIR')"):
        assert want in card, want
    assert "README.md" in verify_export(str(tmp_path / "a"))["files"]
    write_export(model.state_dict(), model.spec, "micro", str(tmp_path / "b"), {"step": 8}, ["metatransformer"])
    card = (tmp_path / "b" / "README.md").read_text()
    assert "Not recorded with this checkpoint" in card and "OpenCLIP" not in card
