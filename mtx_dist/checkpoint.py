"""Checkpoints: DeepSpeed's shards (model, optimizer, scheduler) plus our TrainState per rank.

Layout under ``<run.dir>/checkpoints/``::

    step00000100/                 one tag per save (DeepSpeed's files + ours)
        mp_rank_00_model_states.pt ...       DeepSpeed
        train_state-rank0.json               step, samples, data-stream state, RNG, MLflow run
    latest                        text file naming the newest complete tag (DeepSpeed's format)

``latest`` is replaced atomically after every rank has written its files, so it never names a
half-written checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from mtx_dist.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"


@dataclass
class TrainState:
    """Everything besides weights and optimizer needed to continue a run exactly."""

    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples consumed, all ranks
    loader: dict = field(default_factory=dict)  # this rank's data-stream state
    mlflow_run_id: str | None = None
    rng: str = ""  # base64 torch CPU RNG state

    def capture_rng(self) -> None:
        self.rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()

    def restore_rng(self) -> None:
        if self.rng:
            raw = bytearray(base64.b64decode(self.rng))
            torch.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8).clone())


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_DIR)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _state_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"train_state-rank{rank}.json")


def save(engine, run_dir: str, state: TrainState, rank: int) -> str:
    """Save a checkpoint of the current step on every rank; returns its directory."""
    root = checkpoint_root(run_dir)
    tag = tag_for(state.step)
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    state.capture_rng()
    path = _state_file(os.path.join(root, tag), rank)
    with open(path + ".tmp", "w") as f:
        json.dump(asdict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        with open(os.path.join(root, LATEST + ".tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
    return os.path.join(root, tag)


def resolve(run_dir: str, resume: str) -> str | None:
    """The tag to resume from: ``latest`` (None when no checkpoint exists yet) or a given tag/path."""
    root = checkpoint_root(run_dir)
    if resume == "latest":
        latest = os.path.join(root, LATEST)
        if not os.path.exists(latest):
            return None
        with open(latest) as f:
            return f.read().strip()
    tag = os.path.basename(os.path.normpath(resume))
    if not os.path.isdir(os.path.join(root, tag)):
        raise ConfigError(f"config key 'checkpoint.resume' = {resume!r}: no checkpoint {tag!r} in {root}")
    return tag


def load(engine, run_dir: str, tag: str, rank: int) -> TrainState:
    root = checkpoint_root(run_dir)
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {root}")
    with open(_state_file(os.path.join(root, tag), rank)) as f:
        state = TrainState(**json.load(f))
    state.restore_rng()
    return state
