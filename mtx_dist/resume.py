"""A resume on another layout: what the saved run was, what can be resharded, and the conversion of
partitioned optimizer states through DeepSpeed's universal checkpoint (the data side is
``mtx_data_pipelines.elastic``)."""

from __future__ import annotations

import json
import os
import shutil

import torch.distributed as dist

from mtx_dist import checkpoint as ckpt
from mtx_dist.config import Config, ConfigError
from mtx_dist.engine import Runtime


def saved_run(run_dir: str, tag: str) -> tuple[list[dict], dict]:
    """Every rank's train state (rank order) and the run's config (as TOML data) of a validated checkpoint."""
    import tomllib

    tag_dir = os.path.join(ckpt.checkpoint_root(run_dir), tag)
    manifest = ckpt.validate(tag_dir)
    states = []
    for rel in manifest.get("train_states", []):
        with open(os.path.join(tag_dir, rel)) as f:
            states.append(json.load(f))
    config = {}
    if os.path.isfile(os.path.join(tag_dir, ckpt.CONFIG_FILE)):
        with open(os.path.join(tag_dir, ckpt.CONFIG_FILE), "rb") as f:
            config = tomllib.load(f)
    return states, config


UNIVERSAL_DIR = "universal"  # under run.dir: a resharding resume's converted copy, deleted after the load


def universal_copy(run_dir: str, tag_dir: str, tag: str, rank: int) -> str:
    """Rank 0 writes DeepSpeed's universal checkpoint of ``tag`` (into a temporary folder, then renamed);
    returns the folder holding it once every rank may read it."""
    from mtx_dist.deepspeed_compat import to_universal

    root = os.path.join(run_dir, UNIVERSAL_DIR)
    error = None
    if rank == 0:
        out, tmp = os.path.join(root, tag), os.path.join(root, tag + ckpt.TMP_SUFFIX)
        try:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(root, exist_ok=True)
            to_universal(tag_dir, tmp)
            os.replace(tmp, out)
        except Exception as e:  # noqa: BLE001 -- told to every rank below
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"{type(e).__name__}: {e}"
    if ckpt._distributed() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ckpt.CheckpointError(f"{tag}: could not reshard its states for the new data-parallel size through "
                              f"DeepSpeed's universal checkpoint: {error}")
    return root


def check_layout_change(cfg: Config, runtime: Runtime, tag: str, saved_states: list[dict], saved_config: dict) -> bool:
    """A resume on another data-parallel size (or loader workers) continues the epoch exactly (the
    loader's elastic resume). Returns whether the model and optimizer states must be resharded
    (partitioned states -- ZeRO 1-3, DeepSpeed's bf16 optimizer -- on a changed data-parallel size:
    through DeepSpeed's universal checkpoint); refuses here, before anything loads, what cannot be."""
    groups = runtime.groups
    old_world = len(saved_states)
    old_dp = int(saved_states[0]["loader"].get("world_size", old_world)) if saved_states else old_world
    old_tp = max(1, old_world // max(old_dp, 1))
    if old_tp != groups.tp_size:
        raise ConfigError(f"cannot resume {tag}: it was saved with tensor-parallel size {old_tp}, this run has "
                          f"{groups.tp_size}; changing it on resume is not supported (keep "
                          f"parallel.tensor_parallel = {old_tp})")
    if old_dp == groups.dp_size:
        return False
    if cfg.data.backend == "dali":
        raise ConfigError(f"cannot resume {tag} on {groups.dp_size} data-parallel ranks (saved on {old_dp}) with "
                          "data.backend = 'dali': its reader cannot re-deal an epoch; use data.backend = 'cpu' or the "
                          "saved data-parallel size")
    old = saved_config.get("parallel", {})
    saved = (old.get("zero_stage", 0), old.get("precision", "fp32"))
    if saved != (cfg.parallel.zero_stage, cfg.parallel.precision):
        raise ConfigError(f"cannot resume {tag} on {groups.dp_size} data-parallel ranks (saved on {old_dp}): it was "
                          f"saved with ZeRO-{saved[0]} {saved[1]}, this run has ZeRO-{cfg.parallel.zero_stage} "
                          f"{cfg.parallel.precision}; keep both when changing the data-parallel size")
    partitioned = saved[0] > 0 or saved[1] == "bf16"  # fp32 and amp_bf16 at ZeRO-0 keep whole states
    if partitioned and groups.tp_size > 1:
        raise ConfigError(f"cannot resume {tag} on {groups.dp_size} data-parallel ranks (saved on {old_dp}) with "
                          f"tensor parallelism: resharding ZeRO-{saved[0]} {saved[1]} states goes through DeepSpeed's "
                          "universal checkpoint, which does not know our tensor-parallel layers; resume on "
                          f"{old_dp} data-parallel ranks")
    return partitioned
