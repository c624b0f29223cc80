"""Checkpoints: DeepSpeed's shards (model, optimizer, scheduler) plus our TrainState per rank.

Layout under ``<run.dir>/checkpoints/``::

    step00000100/                 one tag per save (DeepSpeed's files + ours)
        mp_rank_00_model_states.pt ...       DeepSpeed
        train_state-rank0.json               step, samples, data-stream state, RNG, MLflow run
        checkpoint.json                      manifest: every file with its size (+ sha256 of the small ones,
                                             of all with checkpoint.verify = "full")
    latest                        text file naming the newest complete tag (DeepSpeed's format)

A save is atomic. Every rank writes into ``step00000100.tmp/`` and fsyncs what it wrote; after a
barrier rank 0 writes the manifest, renames the directory to its final name, fsyncs the parent and
only then replaces ``latest`` (tmp file + rename, fsynced). A process killed anywhere in between
leaves the previous checkpoint and ``latest`` as they were; the leftover ``.tmp`` directory is never
read and is removed by a later save. Rank 0 then deletes complete checkpoints beyond the newest
``checkpoint.keep``. A failed write (disk full) removes its unfinished directory and raises
:class:`CheckpointError`.

Checkpoints are data, not code: DeepSpeed loads its files with ``torch.load(weights_only=False)``,
so before it sees a checkpoint :func:`validate` checks the manifest (files present, sizes equal) and
loads every ``.pt`` file with ``weights_only=True``. On resume a ``latest`` that fails is skipped with a
warning and the next older complete checkpoint is used; when checkpoints exist but none is valid the
run stops rather than silently starting from scratch.

Sizes and the small files' hashes catch truncation and damaged metadata; a flipped bit inside tensor
data keeps the size. ``checkpoint.verify = "full"`` records the sha256 of every file at save (rank 0
hashes what every rank wrote) and checks them all at resume; ``mtx-dist verify`` checks every hash a
manifest records.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import json
import os
import re
import shutil
import warnings
import zipfile
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from mtx_data_pipelines.files import atomic_write_text, fsync_path, sha256_file
from mtx_dist import faults
from mtx_dist.config import ConfigError
from mtx_dist.deepspeed_compat import (
    checkpoint_safe_globals,
    recording_checkpoint_writes,
)
from mtx_dist.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
CONFIG_FILE = "config.toml"
MODEL_CONFIG_FILE = "model_config.json"  # a copy of the model config file model.preset names, if any
MANIFEST = "checkpoint.json"
MANIFEST_FORMAT = "mtx-dist-checkpoint"
TMP_SUFFIX = ".tmp"  # a save in progress, or one that was killed
OLD_SUFFIX = ".old"  # a checkpoint being replaced or deleted
HASH_MAX_BYTES = 1 << 20  # files up to this size (our train states) get a sha256; DeepSpeed's shards a size only
_FULL_BYTES = 64 << 20  # after a failed write, less free space than this means the disk filled up
_TAG = re.compile(r"step(\d{8})")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that could not be written, or none that can be trusted to resume from."""

    label = "checkpoint error"


class CheckpointWarning(UserWarning):
    """A checkpoint skipped on resume because it failed validation (an older one is used)."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer needed to continue a run exactly."""

    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples consumed, all ranks
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
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


def _step_of(tag: str) -> int | None:
    m = _TAG.fullmatch(tag)
    return int(m.group(1)) if m else None


def _state_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"train_state-rank{rank}.json")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _files(tag_dir: str) -> list[str]:
    """Relative paths ('/'-separated) of the regular files under ``tag_dir``, manifest excluded."""
    out = []
    for here, dirs, names in os.walk(tag_dir):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(here, name), tag_dir).replace(os.sep, "/")
            if rel != MANIFEST and os.path.isfile(os.path.join(here, name)):
                out.append(rel)
    return sorted(out)


def _tags(root: str) -> list[str]:
    """Final-named checkpoint directories (no ``.tmp``/``.old``), newest step first."""
    if not os.path.isdir(root):
        return []
    tags = [n for n in os.listdir(root) if _step_of(n) is not None and os.path.isdir(os.path.join(root, n))]
    return sorted(tags, key=_step_of, reverse=True)


def read_latest(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


# -- save -------------------------------------------------------------------------------------------

def save(engine, run_dir: str, state: TrainState, rank: int, keep: int = 3, config_toml: str | None = None,
         full_hashes: bool = False, model_config: str | None = None, direct: bool = True) -> str:
    """Write a checkpoint of the current step atomically, on every rank; returns its directory.

    ``keep``: complete checkpoints kept (this one included); rank 0 deletes older ones once
    ``latest`` names the new one. ``config_toml``: the run's config, written by rank 0 as
    ``config.toml`` (listed in the manifest) so that the checkpoint says what model it holds;
    ``model_config``: the text of the model config file ``model.preset`` names (read once per run),
    written as ``model_config.json``: exports and evaluations of the checkpoint read the geometry from
    it, not from that file, which may have moved or changed since. ``direct``: DeepSpeed's files are
    written past the page cache (``mtx_data_pipelines.files.DirectFile``). A write
    that fails (e.g. the disk is full) removes the unfinished directory and raises
    :class:`CheckpointError`; the previous checkpoint and ``latest`` are untouched. ``full_hashes``:
    the manifest records the sha256 of every file, not only of the small ones.
    (``checkpoint.async``: :class:`mtx_dist.async_checkpoint.AsyncCheckpointer`, same files and protocol.)
    """
    p = SavePaths.of(run_dir, state.step)
    faults.hit("save-begin", p.step, rank)
    try:
        begin_save(p, rank)
        with recording_checkpoint_writes(engine, direct) as written:
            engine.save_checkpoint(p.root, tag=os.path.basename(p.tmp), save_latest=False)
        faults.hit("save-model", p.step, rank)
        state.capture_rng()
        write_rank_files(p, rank, json.dumps(asdict(state)), config_toml, written, model_config)
        faults.hit("save-state", p.step, rank)
        _barrier()  # every rank's files are on disk
        if rank == 0:
            commit(p, keep, full_hashes)
    except CheckpointError:
        shutil.rmtree(p.tmp, ignore_errors=True)
        raise
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise save_error(e, p) from e
    _barrier()  # nobody goes on before `latest` names the new checkpoint
    return p.final


@dataclass(frozen=True)
class SavePaths:
    """Where the save of one step goes: written into ``tmp``, renamed to ``final`` under ``root``."""

    root: str
    tag: str
    step: int
    final: str
    tmp: str

    @classmethod
    def of(cls, run_dir: str, step: int) -> SavePaths:
        root, tag = checkpoint_root(run_dir), tag_for(step)
        return cls(root, tag, step, os.path.join(root, tag), os.path.join(root, tag + TMP_SUFFIX))


def begin_save(p: SavePaths, rank: int) -> None:
    """Every rank: rank 0 makes the folder and clears what a killed save of this step left; a barrier."""
    if rank == 0:
        os.makedirs(p.root, exist_ok=True)
        shutil.rmtree(p.tmp, ignore_errors=True)
    _barrier()


def write_rank_files(p: SavePaths, rank: int, state_json: str, config_toml: str | None,
                     written: list[str] | None, model_config: str | None = None) -> None:
    """This rank's train state (and rank 0's config and the copy of its model config file), then an
    fsync of everything this rank wrote (``written``: DeepSpeed's files; None = every file of the folder)."""
    _write_text(_state_file(p.tmp, rank), state_json)
    if rank == 0 and config_toml is not None:  # before the manifest lists the files
        _write_text(os.path.join(p.tmp, CONFIG_FILE), config_toml)
    if rank == 0 and model_config is not None:
        _write_text(os.path.join(p.tmp, MODEL_CONFIG_FILE), model_config)
    for path in (written if written is not None else [os.path.join(p.tmp, f) for f in _files(p.tmp)]):
        fsync_path(path)


def commit(p: SavePaths, keep: int, full_hashes: bool = False) -> None:
    """Rank 0, once every rank's files are durable: manifest, rename, ``latest``, then old ones go."""
    root, tmp, final, tag, step = p.root, p.tmp, p.final, p.tag, p.step
    world = dist.get_world_size() if _distributed() else 1
    states = [os.path.basename(_state_file(tmp, r)) for r in range(world)]
    missing = [s for s in states if not os.path.isfile(os.path.join(tmp, s))]
    if missing:
        raise CheckpointError(f"checkpoint {tag} in {root}: {', '.join(missing)} missing after every rank saved")
    files = {}
    for rel in _files(tmp):
        path = os.path.join(tmp, rel)
        files[rel] = {"size": os.path.getsize(path)}
        if full_hashes or files[rel]["size"] <= HASH_MAX_BYTES:
            files[rel]["sha256"] = sha256_file(path)
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "tag": tag, "step": step, "world_size": world,
                "train_states": states, "files": files}
    _write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    fsync_path(tmp)
    faults.hit("save-manifest", step, 0)
    old = final + OLD_SUFFIX
    if os.path.exists(final):  # this step saved before: a save killed before `latest` moved, or an older timeline
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(root)
    faults.hit("save-rename", step, 0)
    latest = os.path.join(root, LATEST)
    atomic_write_text(latest, tag)
    try:
        _prune(root, tag, keep)
    except OSError as e:  # the new checkpoint is complete; failing to delete old ones must not fail the run
        warnings.warn(f"could not delete old checkpoints in {root}: {e}", CheckpointWarning, stacklevel=3)


def _prune(root: str, current: str, keep: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep`` up to ``current`` (never the one
    ``latest`` names; never newer ones, e.g. of a timeline resumed from an older tag), and leftovers
    of killed saves. A directory is renamed before it is deleted, so it never looks half there."""
    latest, step = read_latest(root), _step_of(current)
    complete = [t for t in _tags(root) if _step_of(t) <= step and os.path.isfile(os.path.join(root, t, MANIFEST))]
    for tag in complete[keep:]:
        if tag not in (current, latest):
            os.replace(os.path.join(root, tag), os.path.join(root, tag + OLD_SUFFIX))
            shutil.rmtree(os.path.join(root, tag + OLD_SUFFIX), ignore_errors=True)
    for name in os.listdir(root):
        stem, suffix = os.path.splitext(name)
        if suffix in (TMP_SUFFIX, OLD_SUFFIX) and _step_of(stem) is not None:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_error(e: BaseException, p: SavePaths) -> CheckpointError:
    """The error a failed write raises, naming the cause (a full disk said so); removes the unfinished folder."""
    root, tmp, tag = p.root, p.tmp, p.tag
    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(root).free
    shutil.rmtree(tmp, ignore_errors=True)  # best effort: give the space back
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e) \
        or (free is not None and free < _FULL_BYTES)
    if full:
        why = (f"No space left on device (ENOSPC): {free / 2**20:.1f} MiB free on that filesystem after the "
               f"failed write" if free is not None else "No space left on device (ENOSPC)")
    else:
        why = f"{type(e).__name__}: {e}"
    previous = read_latest(root)
    kept = f"the previous checkpoint {previous} is untouched" if previous else "no earlier checkpoint exists"
    return CheckpointError(f"could not write checkpoint {tag} in {root}: {why}. The unfinished {tag}{TMP_SUFFIX} "
                           f"was removed and {kept}" + (" (free space, then --resume latest)" if full else ""))


# -- validate, resolve, load ------------------------------------------------------------------------

@functools.cache
def _unpickle_error(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it references {m.group(1)}, which a checkpoint may not contain (unpickling it could run code)"
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(boiler)]
    return f"{type(e).__name__}: {' '.join(lines)[:300] or text[:300]}"


def _check_pt(path: str) -> None:
    """Load a torch file as data only; raises with the reason. Its pickle is CRC-checked first (cheap:
    the pickle is small), since a changed byte in it can still unpickle into different values."""
    zipped = zipfile.is_zipfile(path)
    if zipped:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith("/data.pkl"):
                    z.read(name)  # raises BadZipFile on a CRC mismatch
    with torch.serialization.safe_globals(list(checkpoint_safe_globals())):
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)


def _fingerprint(tag_dir: str) -> tuple:
    return tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino)
                 for rel in [*_files(tag_dir), MANIFEST] if os.path.exists(os.path.join(tag_dir, rel))
                 for st in [os.stat(os.path.join(tag_dir, rel))])


_validated: dict[tuple[str, bool], tuple[tuple, dict]] = {}  # (realpath, full) -> (fingerprint, manifest)


def validate(tag_dir: str, full: bool = False) -> dict:
    """Check a checkpoint directory before anything unpickles it; returns its manifest.

    The manifest exists and parses; every file it lists exists with the listed size (and sha256 where
    listed: of the small files, or with ``full`` of every file the manifest hashed); every ``.pt`` file
    is listed and loads with ``torch.load(weights_only=True)``; the train states parse. Raises
    :class:`CheckpointError` naming the tag, the file and the reason.
    """
    tag = os.path.basename(os.path.normpath(tag_dir))
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{tag}: no such checkpoint directory ({tag_dir})")
    key, fingerprint = (os.path.realpath(tag_dir), full), _fingerprint(tag_dir)
    if key in _validated and _validated[key][0] == fingerprint:
        return _validated[key][1]
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{tag}: no {MANIFEST} (a save that did not finish, or not a mtx-dist checkpoint)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tag}: {MANIFEST} is unreadable: {e}") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{tag}: {MANIFEST} is not a mtx-dist checkpoint manifest")

    def bad(rel: str, why: str) -> CheckpointError:
        return CheckpointError(f"{tag}: {rel} is not a valid checkpoint file: {why}")

    for rel, meta in sorted(files.items()):
        path_ = os.path.join(tag_dir, rel)
        if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
            raise bad(rel, f"{MANIFEST} names a path outside the checkpoint")
        if not os.path.isfile(path_):
            raise bad(rel, f"missing (listed in {MANIFEST})")
        size = os.path.getsize(path_)
        if size != meta.get("size"):
            raise bad(rel, f"{size} bytes where {MANIFEST} lists {meta.get('size')} (truncated or altered)")
        if "sha256" in meta and (full or size <= HASH_MAX_BYTES) and sha256_file(path_) != meta["sha256"]:
            raise bad(rel, f"its sha256 differs from the one in {MANIFEST} (altered)")
    for rel in _files(tag_dir):
        if rel.endswith(".pt") and rel not in files:  # DeepSpeed globs some of its files: a stray one would load
            raise bad(rel, f"not listed in {MANIFEST}")
    for rel in sorted(files):
        if rel.endswith(".pt"):
            try:
                _check_pt(os.path.join(tag_dir, rel))
            except Exception as e:  # any failure to load as data is the reason
                raise bad(rel, _unpickle_error(e)) from e
    for rel in manifest.get("train_states", []):
        try:
            with open(os.path.join(tag_dir, rel)) as f:
                st = json.load(f)
            if st.get("step") != manifest.get("step"):
                raise ValueError(f"step {st.get('step')} where {MANIFEST} says {manifest.get('step')}")
        except (OSError, ValueError, AttributeError) as e:
            raise bad(rel, str(e)) from e
    _validated[key] = (fingerprint, manifest)
    return manifest


def resolve(run_dir: str, resume: str, full: bool = False) -> str | None:
    """The validated tag to resume from (see :func:`validate`).

    ``latest``: the tag ``latest`` names, else -- with a :class:`CheckpointWarning` for each one skipped
    -- the next older complete checkpoint; None when there is no checkpoint at all (a fresh start);
    :class:`CheckpointError` when checkpoints exist but none is valid. A tag or path: that checkpoint
    (ConfigError when it does not exist, CheckpointError when it is not valid). ``full``: check every
    recorded sha256 (see :func:`validate`). Under
    torch.distributed rank 0 decides and broadcasts, so every rank loads the same checkpoint.
    """
    if not _distributed() or dist.get_world_size() == 1:
        return _resolve(run_dir, resume, full)
    box: list = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", _resolve(run_dir, resume, full))
        except Exception as e:  # noqa: BLE001 -- told to every rank, re-raised below
            error, box[0] = e, ("config" if isinstance(e, ConfigError) else "checkpoint", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "ok":
        return value
    raise (ConfigError if kind == "config" else CheckpointError)(value)


def _resolve(run_dir: str, resume: str, full: bool = False) -> str | None:
    root = checkpoint_root(run_dir)
    if resume != "latest":
        tag = os.path.basename(os.path.normpath(resume))
        if not os.path.isdir(os.path.join(root, tag)):
            raise ConfigError(f"config key 'checkpoint.resume' = {resume!r}: no checkpoint {tag!r} in {root}")
        validate(os.path.join(root, tag), full)
        return tag
    tags, latest = _tags(root), read_latest(root)
    if latest is None and not tags:
        return None
    candidates = list(tags)
    if latest is not None:
        newest = _step_of(latest)
        candidates = [latest] + [t for t in tags if t != latest and (newest is None or _step_of(t) < newest)]
    failures = []
    for i, tag in enumerate(candidates):
        try:
            validate(os.path.join(root, tag), full)
            return tag
        except CheckpointError as e:
            failures.append(str(e))
            then = "; trying the previous one" if i + 1 < len(candidates) else ""
            warnings.warn(f"skipping checkpoint {e} [in {root}]{then}", CheckpointWarning, stacklevel=3)
    raise CheckpointError(f"no valid checkpoint to resume from in {root}, and not starting from scratch over "
                          f"existing ones:\n  " + "\n  ".join(failures) +
                          "\nRepair or move them away, or resume a valid one with checkpoint.resume=TAG.")


def load(engine, run_dir: str, tag: str, rank: int, full: bool = False, universal: bool = False) -> TrainState:
    """Load a checkpoint on every rank: validated first (cached when :func:`resolve` just did it),
    so DeepSpeed, which unpickles with weights_only=False, only ever sees files that are data.

    ``universal``: the checkpoint's partitioned states (ZeRO 1-3, DeepSpeed's bf16 optimizer) were saved
    on another data-parallel size. Rank 0 converts the tag into DeepSpeed's universal checkpoint under
    ``<run.dir>/universal/`` (the engine was built with ``checkpoint.load_universal``), every rank
    loads its new partition from it, and the converted copy is deleted."""
    root = checkpoint_root(run_dir)
    tag_dir = os.path.join(root, tag)
    manifest = validate(tag_dir, full)
    saved_world = int(manifest.get("world_size", 1))
    # More ranks than saved them (an elastic resume, checked by the trainer): global counters are the
    # same in every rank's state; the RNG state is that of rank (rank mod saved ranks).
    state_path = _state_file(tag_dir, rank if rank < saved_world else rank % saved_world)
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{tag}: no {os.path.basename(state_path)}: the checkpoint was written by "
                              f"{saved_world} rank(s)")
    from mtx_dist.resume import universal_copy  # imports this module

    load_root = universal_copy(run_dir, tag_dir, tag, rank) if universal else root
    path, _ = engine.load_checkpoint(load_root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag!r} from {load_root}")
    if universal:
        _barrier()  # every rank has read its partition
        if rank == 0:
            shutil.rmtree(load_root, ignore_errors=True)
    with open(state_path) as f:
        state = TrainState(**json.load(f))
    state.restore_rng()
    return state
