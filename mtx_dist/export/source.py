"""Weights and provenance from what a user points at: a run directory, a checkpoint directory, or
(for evaluation) an OpenCLIP-format export.

A checkpoint is validated (every file listed, every ``.pt`` loading as data only) before DeepSpeed's
merger unpickles it, then consolidated from any ZeRO stage and TP size into the names of the plain
model. Its geometry comes from the ``config.toml`` the trainer saves into every checkpoint (and, when
``model.preset`` names a model config file, from the checkpoint's copy of that file).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field

import torch

from mtx_dist import checkpoint as ckpt
from mtx_dist.config import Config, ConfigError, load_config
from mtx_dist.errors import UserError
from mtx_dist.export.common import (
    MANIFEST_FILE,
    OPENCLIP_CONFIG,
    OPENCLIP_FILE,
    ExportError,
    verify_export,
)
from mtx_dist.models import ContrastiveModel
from mtx_dist.models.presets import GeometryError, ModelSpec, get_preset, is_config_path, spec_from_openclip

CONFIG_FILE = "config.toml"


class SourceError(UserError, ValueError):
    """A path that is not a run directory, a checkpoint, or an export of the kind needed."""


@dataclass
class Source:
    """Full float32 weights under our names, with where they came from."""

    preset: str  # the geometry's name: a preset, or ``<preset>-custom`` with custom geometry keys
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    info: dict  # provenance recorded in export manifests and MLflow
    cfg: Config | None = None  # the training run's config (None for an export)
    kind: str = "checkpoint"  # or "export"
    extra: dict = field(default_factory=dict)

    def model(self) -> ContrastiveModel:
        """Our model with these weights (eval mode, CPU, float32)."""
        model = build_plain_model(self.spec, "logit_bias" in self.state_dict)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def build_plain_model(spec: ModelSpec, logit_bias: bool, device: str | torch.device | None = None) -> ContrastiveModel:
    with torch.device(device or "cpu"):
        return ContrastiveModel(spec, logit_bias_init=0.0 if logit_bias else None)


def check_weights(state: dict[str, torch.Tensor], spec: ModelSpec, preset: str, what: str) -> None:
    """The tensors of a whole model of geometry ``spec`` (named ``preset``), no more, no fewer, with its shapes."""
    expected = build_plain_model(spec, "logit_bias" in state, device="meta").state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise SourceError(f"{what} does not hold a {preset!r} model: missing {missing[:6]}, unexpected "
                          f"{unexpected[:6]}, shape mismatches {shapes[:6]}")


def find_checkpoint(path: str) -> tuple[str, str | None]:
    """(checkpoint directory, run directory or None) for a run or checkpoint directory."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise SourceError(f"{path}: no such directory (expected a run directory or a checkpoint directory)")
    if os.path.isfile(os.path.join(path, ckpt.MANIFEST)):
        parent = os.path.dirname(path)
        return path, os.path.dirname(parent) if os.path.basename(parent) == ckpt.CHECKPOINT_DIR else None
    if os.path.isdir(ckpt.checkpoint_root(path)):
        tag = ckpt.resolve(path, "latest")  # validated; skips a damaged latest with a warning
        if tag is None:
            raise SourceError(f"{path}: the run has no complete checkpoint in {ckpt.checkpoint_root(path)}")
        return os.path.join(ckpt.checkpoint_root(path), tag), path
    raise SourceError(f"{path}: neither a run directory (with {ckpt.CHECKPOINT_DIR}/) nor a checkpoint directory "
                      f"(with {ckpt.MANIFEST})")


def load_checkpoint(path: str, preset: str | None = None) -> Source:
    """Consolidated weights of a run's latest checkpoint or of one checkpoint directory.

    ``preset`` is needed only for checkpoints written before runs saved their config.
    """
    from mtx_dist.parallel.consolidate import consolidate_checkpoint

    tag_dir, run_dir = find_checkpoint(path)
    manifest = ckpt.validate(tag_dir)  # before anything unpickles its files
    cfg = None
    config_path = os.path.join(tag_dir, CONFIG_FILE)
    if os.path.isfile(config_path):
        cfg, recorded = _checkpoint_config(tag_dir, config_path)
        if preset is not None and preset != recorded:
            raise SourceError(f"--preset {preset} contradicts the checkpoint's config (model.preset = "
                              f"{recorded!r})")
        preset, spec = cfg.model.geometry_name.replace(cfg.model.preset, recorded, 1), cfg.model.spec
    elif preset is None:
        raise SourceError(f"{tag_dir} has no {CONFIG_FILE} (written before runs saved their config): "
                          f"name its geometry with --preset")
    else:
        spec = _named_spec(preset, tag_dir)
    state = consolidate_checkpoint(tag_dir)
    check_weights(state, spec, preset, tag_dir)
    with open(os.path.join(tag_dir, manifest.get("train_states", ["train_state-rank0.json"])[0])) as f:
        train_state = json.load(f)
    info = {"run_dir": run_dir, "checkpoint": os.path.basename(tag_dir), "step": train_state.get("step"),
            "samples": train_state.get("samples"), "mlflow_run_id": train_state.get("mlflow_run_id"),
            "world_size": manifest.get("world_size")}
    if cfg is not None:
        info.update(data=cfg.data.train or "demo shards", zero_stage=cfg.parallel.zero_stage, tensor_parallel=cfg.parallel.tensor_parallel,
                    precision=cfg.parallel.precision, loss=cfg.loss.kind)
    return Source(preset, spec, state, info, cfg)


def _checkpoint_config(tag_dir: str, config_path: str) -> tuple[Config, str]:
    """The checkpoint's config and the ``model.preset`` it records. When that is a model config file, its
    geometry is read from the checkpoint's own copy (``model_config.json``): the file may have moved or
    changed since the run started (checkpoints written before runs kept a copy read the file itself)."""
    with open(config_path, "rb") as f:
        recorded = tomllib.load(f).get("model", {}).get("preset", Config().model.preset)
    copy = os.path.join(tag_dir, ckpt.MODEL_CONFIG_FILE)
    own = is_config_path(recorded) and os.path.isfile(copy)
    try:
        return load_config(config_path, [f"model.preset={copy}"] if own else []), recorded
    except ConfigError as e:
        raise SourceError(f"{config_path}: the checkpoint's config does not load: {e}") from e


def _named_spec(preset: str, where: str) -> ModelSpec:
    try:
        return get_preset(preset)
    except GeometryError as e:
        raise SourceError(f"{where}: {e}") from None


def load_openclip_export(path: str) -> Source:
    """Weights of an ``open_clip``-format export (verified against its manifest first)."""
    from safetensors.torch import load_file

    from mtx_dist.interop.openclip import from_openclip

    manifest = verify_export(path, require=OPENCLIP_FILE)
    preset = manifest.get("preset")
    try:  # the geometry as written beside the weights (exact also for custom geometry)
        with open(os.path.join(path, OPENCLIP_CONFIG)) as f:
            spec = spec_from_openclip(json.load(f), os.path.join(path, OPENCLIP_CONFIG))
    except (OSError, ValueError, GeometryError) as e:
        raise ExportError(f"{os.path.join(path, OPENCLIP_CONFIG)}: {e}") from None
    state = {k: v.float() for k, v in from_openclip(load_file(os.path.join(path, OPENCLIP_FILE)), spec).items()}
    check_weights(state, spec, preset, os.path.join(path, OPENCLIP_FILE))
    info = {"export_dir": os.path.abspath(path), "dtype": manifest.get("dtype"), **manifest.get("source", {})}
    return Source(preset, spec, state, info, None, kind="export")


def load_any(path: str, preset: str | None = None) -> Source:
    """A run directory, a checkpoint directory, or an export directory that holds both towers."""
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)) and not os.path.isdir(ckpt.checkpoint_root(path)):
        try:
            with open(os.path.join(path, MANIFEST_FILE)) as f:
                files = json.load(f).get("files", {})
        except (OSError, ValueError, AttributeError) as e:
            raise ExportError(f"{os.path.join(path, MANIFEST_FILE)}: cannot read the export manifest: {e}") from e
        if OPENCLIP_FILE not in files:
            raise SourceError(f"{path} is a Meta-Transformer (image blocks only) export: it has no text tower. "
                              f"Evaluation accepts a run directory, a checkpoint directory, or an export made "
                              f"with --format open_clip")
        return load_openclip_export(path)
    return load_checkpoint(path, preset)
