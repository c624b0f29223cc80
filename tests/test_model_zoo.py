"""Geometry by name: OpenCLIP's ViT model configs, read from the installed open_clip_torch, and
open_clip_config.json paths; what our towers cannot build is refused naming the key."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from mtx_dist.config import ConfigError, load_config
from mtx_dist.models import ContrastiveModel
from mtx_dist.models.presets import GeometryError, get_preset, openclip_names, spec_from_openclip
from tests.helpers import run_cli

NAMES = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_named_geometry_has_open_clips_parameter_counts(open_clip, name):
    """Built on the meta device on both sides: no weights are allocated, even for ViT-bigG-14."""
    theirs = open_clip.create_model(name, device="meta")
    with torch.device("meta"):
        ours = ContrastiveModel(get_preset(name))
    assert _count(ours) == _count(theirs)
    assert _count(ours.visual) == _count(theirs.visual)
    assert ours.spec.vision.tokens == (theirs.visual.positional_embedding.shape[0])


def test_our_aliases_are_open_clips_geometry():
    assert get_preset("vit-b16") == get_preset("ViT-B-16") and get_preset("vit-l14") == get_preset("ViT-L-14")
    assert set(NAMES) <= set(openclip_names())


@pytest.mark.parametrize("name, key", [("ViT-B-32-quickgelu", "quick_gelu"), ("RN50", "layers"),
                                       ("ViT-B-16-SigLIP", "timm_model_name"), ("coca_ViT-B-32", "multimodal_cfg")])
def test_geometry_our_towers_lack_is_refused_naming_the_key(name, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.preset={name}"])
    assert key in str(e.value) and "model.preset" in str(e.value)


def test_a_config_json_is_a_preset_and_bad_geometry_names_its_key(tmp_path):
    cfg = {"embed_dim": 48, "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "head_width": 32,
                                           "mlp_ratio": 3.0, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    path = tmp_path / "geometry.json"
    path.write_text(json.dumps(cfg))
    spec = get_preset(str(path))
    assert (spec.vision.heads, spec.vision.mlp_ratio, spec.text.layers, spec.embed_dim) == (3, 3.0, 1, 48)
    for bad, key in ((("vision_cfg", "patch_size", 7), "patch_size"), (("text_cfg", "heads", 3), "heads"),
                     (("text_cfg", "vocab_size", 250000), "vocab_size")):
        broken = json.loads(json.dumps(cfg))
        broken[bad[0]][bad[1]] = bad[2]
        with pytest.raises(GeometryError) as e:
            spec_from_openclip(broken, "x.json")
        assert key in str(e.value)


def test_a_custom_geometry_trains_exports_and_its_export_config_is_the_same_preset(tmp_path):
    cfg = {"embed_dim": 48, "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "head_width": 32,
                                           "mlp_ratio": 3.0, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "geometry.json").write_text(json.dumps(cfg))
    res = run_cli(["train", "model.preset=geometry.json", "run.steps=3", "optim.warmup_steps=1", "data.batch_size=8",
                   "data.workers=0", "tracking.enabled=false", "run.eval_at_end=false", "run.dir=run"],
                  cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    exported = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "run") for f in fs
                if f == "open_clip_config.json"]
    assert exported, "the end-of-run export wrote no open_clip_config.json"
    assert get_preset(exported[0]) == get_preset(str(tmp_path / "geometry.json"))
    # the checkpoint carries a copy of its model config: it still exports after the file has moved
    (tmp_path / "geometry.json").rename(tmp_path / "moved.json")
    res = run_cli(["export", "run", "--format", "open_clip", "--out", "again"], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert get_preset(str(tmp_path / "again" / "open_clip_config.json")) == get_preset(str(tmp_path / "moved.json"))
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["preset"] == str(tmp_path / "geometry.json")  # the name the run was given


def test_custom_geometry_keys_train_export_and_evaluate(tmp_path):
    """model.vision.* / model.text.* / model.embed_dim override the preset: the run trains, its export
    records the custom geometry (OpenCLIP builds it from the export's own config), and `mtx-dist eval`
    rebuilds the same model from the export."""
    keys = ["model.preset=micro", "model.vision.width=96", "model.vision.heads=3", "model.vision.mlp_ratio=3.0",
            "model.text.layers=1", "model.embed_dim=48"]
    res = run_cli(["train", *keys, "run.steps=3", "optim.warmup_steps=1", "data.batch_size=8", "data.workers=0",
                   "tracking.enabled=false", "run.eval_at_end=false", "run.dir=run"], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    export = tmp_path / "run" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["preset"] == "micro-custom"
    assert (export / "mtx-micro-custom.json").is_file()  # a config for open_clip.add_model_config, not micro's
    spec = get_preset(str(export / "open_clip_config.json"))
    assert (spec.vision.width, spec.vision.heads, spec.vision.mlp_ratio, spec.text.layers, spec.embed_dim) == \
        (96, 3, 3.0, 1, 48)
    val = sorted(glob.glob(str(tmp_path / "data" / "demo" / "val-*.tar")))
    assert val, "no demo val shards"
    res = run_cli(["eval", str(export), "--data", val[0], "--no-tracking", "--json"], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "eval of micro-custom" in res.stdout
    metrics = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("metrics: "))[len("metrics: "):])
    assert metrics["n_retrieval"] > 0


@pytest.mark.parametrize("key, value, named", [("model.vision.heads", 5, "model.vision.heads"),
                                               ("model.vision.patch_size", 7, "model.vision.image_size"),
                                               ("model.text.width", 63, "model.text.heads")])
def test_bad_custom_geometry_is_refused_naming_the_key(key, value, named):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.preset=micro", f"{key}={value}"])
    assert str(e.value).startswith(f"config key '{named}'")


def test_export_names_of_custom_and_file_geometries():
    from mtx_dist.export.writers import openclip_arch

    micro = get_preset("micro")
    assert openclip_arch("ViT-B-32", get_preset("ViT-B-32")) == ("ViT-B-32", True)
    assert openclip_arch("vit-b16", get_preset("vit-b16")) == ("ViT-B-16", True)
    assert openclip_arch("micro", micro) == ("mtx-micro", False)
    assert openclip_arch("ViT-B-32-custom", micro) == ("mtx-ViT-B-32-custom", False)
    assert openclip_arch("/runs/a/export/open_clip_config.json-custom", micro) == ("mtx-export-custom", False)
    assert openclip_arch("/cfg/geo.json", micro)[0] == "mtx-geo"
