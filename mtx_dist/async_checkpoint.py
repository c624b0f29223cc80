"""Asynchronous checkpoints (``checkpoint.async = true``): training stops only to copy the state.

A save runs in three parts, with the files and the atomic protocol of :mod:`mtx_dist.checkpoint`:

1. **Snapshot** (the training thread, every rank): DeepSpeed's ``save_checkpoint`` runs as usual,
   but each state dict it hands its checkpoint engine is copied into host buffers (pinned on CUDA)
   instead of being written (``deferred_checkpoint_writes``). The buffers are kept from save to save:
   copying into memory that is already mapped runs at memory speed, where fresh allocations would
   page-fault every byte in again. This is the only stall training sees.
2. **Write** (a background thread per rank): DeepSpeed's own writer writes the copies into the
   ``.tmp`` folder, then this rank's train state; everything is fsynced.
3. **Commit** (rank 0's background thread): manifest, rename, ``latest``, old ones pruned, exactly
   as a synchronous save does, once *every* rank has written.

Ranks learn that every rank has written without a collective of their own: each step's one small
all-reduce (:class:`mtx_dist.optim.GuardedAdamW`) carries each rank's status, MAX-reduced: ``IDLE``
(nothing in flight, or this rank's part is done), ``BUSY``, ``FAILED``. The first step that agrees on
``IDLE`` during the write starts rank 0's commit; the next one that agrees on ``IDLE`` ends the save
on every rank. A failure anywhere reaches every rank at the same step and raises
:class:`CheckpointError` there (the previous checkpoint and ``latest`` are untouched).

At most one save is in flight: a save first waits for the previous one (:meth:`drain`, two small
collectives), and so do a preemption and the end of the run. A process killed during the write or
the commit leaves the previous checkpoint as ``latest`` and a ``.tmp`` folder that is never read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import json
import os
import shutil
import threading
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from mtx_dist import checkpoint as ckpt
from mtx_dist import faults
from mtx_dist.deepspeed_compat import deferred_checkpoint_writes

IDLE, BUSY, FAILED = 0, 1, 2  # a rank's status in the step's collective; higher wins


@dataclass
class _InFlight:
    paths: ckpt.SavePaths
    future: concurrent.futures.Future
    committing: bool = False  # False: the ranks are writing; True: rank 0 commits


class AsyncCheckpointer:
    """One per rank. The trainer calls :meth:`status` before each step, :meth:`agreed` with the step's
    agreed status after it, :meth:`save` where a synchronous run would call ``checkpoint.save``, and
    :meth:`drain` before it stops; every rank makes the same calls at the same steps."""

    def __init__(self, run_dir: str, rank: int, device: torch.device, keep: int = 3, full_hashes: bool = False,
                 direct: bool = True):
        self.run_dir, self.rank, self.device = run_dir, rank, device
        self.keep, self.full_hashes, self.direct = keep, full_hashes, direct
        self.last: str | None = None  # the newest checkpoint this run committed
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}  # (file, tensor index) -> host copy
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mtx-checkpoint",
                                                           initializer=_lower_priority)
        self._flight: _InFlight | None = None

    # -- the training thread ---------------------------------------------------------------------

    def save(self, engine, state: ckpt.TrainState, config_toml: str | None = None,
             model_config: str | None = None) -> str:
        """Snapshot this step's state and start writing it; returns the folder it will have once
        committed. Waits for the save in flight first."""
        self.drain()
        p = ckpt.SavePaths.of(self.run_dir, state.step)
        faults.hit("save-begin", p.step, self.rank)
        try:
            ckpt.begin_save(p, self.rank)
            state.capture_rng()
            state_json = json.dumps(asdict(state))
            with deferred_checkpoint_writes(engine, self._snapshot, self.direct) as files:
                engine.save_checkpoint(p.root, tag=os.path.basename(p.tmp), save_latest=False)
            if files is None:
                raise ckpt.CheckpointError("checkpoint.async: this DeepSpeed engine has no checkpoint engine whose "
                                           "writes can be deferred; use checkpoint.async = false")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the copies into pinned memory have landed
        except ckpt.CheckpointError:
            shutil.rmtree(p.tmp, ignore_errors=True)
            raise
        except (OSError, RuntimeError) as e:
            raise ckpt.save_error(e, p) from e
        write = self._pool.submit(self._write, p, files, state_json, config_toml, model_config)
        self._flight = _InFlight(p, write)
        return p.final

    def status(self) -> int:
        """This rank's status for the next step's collective."""
        f = self._flight
        if f is None or not f.future.done():
            return IDLE if f is None else BUSY
        return FAILED if f.future.exception() is not None else IDLE

    def agreed(self, status: int) -> None:
        """The status every rank agreed on at a step: advance the save in flight, or raise its failure."""
        f = self._flight
        if f is None:
            return
        if status >= FAILED:
            self._flight = None
            error = f.future.exception() if f.future.done() else None
            if self.rank == 0:
                shutil.rmtree(f.paths.tmp, ignore_errors=True)
            if isinstance(error, ckpt.CheckpointError):
                raise error
            kept = ckpt.read_latest(f.paths.root)
            why = f"{type(error).__name__}: {error}" if error else "another rank failed to write its part"
            previous = f"the previous checkpoint {kept} is untouched" if kept else "no earlier checkpoint exists"
            raise ckpt.CheckpointError(f"could not write checkpoint {f.paths.tag} in {f.paths.root}: {why}; {previous}")
        if status != IDLE:
            return
        if not f.committing:  # every rank has written its part
            f.committing = True
            f.future = self._pool.submit(self._commit, f.paths) if self.rank == 0 else _done()
        else:  # rank 0 has committed: `latest` names it
            self.last, self._flight = f.paths.final, None

    def drain(self) -> str | None:
        """Wait until the save in flight is committed (two small collectives when one is); returns the
        newest committed checkpoint. Every rank calls it at the same point."""
        while self._flight is not None:
            concurrent.futures.wait([self._flight.future])
            status = torch.tensor([self.status()], dtype=torch.int32, device=self.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(status, op=dist.ReduceOp.MAX)
            self.agreed(int(status.item()))
        return self.last

    def close(self) -> None:
        """Let a write in progress finish (never commits it: the other ranks may not have written)."""
        self._pool.shutdown(wait=True)

    # -- copies ------------------------------------------------------------------------------------

    def _snapshot(self, state_dict, path: str):
        """``state_dict`` with every tensor replaced by a host copy (reused buffers); containers are
        copied, other values kept (DeepSpeed builds them for this save)."""
        name, index = os.path.basename(path), iter(range(1 << 62))
        pin = self.device.type == "cuda"

        def take(x):
            if isinstance(x, torch.Tensor):
                key = (name, next(index))
                buf = self._buffers.get(key)
                if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
                    buf = self._buffers[key] = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=pin)
                return buf.copy_(x.detach(), non_blocking=pin)
            if isinstance(x, dict):
                out = copy.copy(x)  # keeps the mapping's type (OrderedDict, defaultdict)
                for k, v in x.items():
                    out[k] = take(v)
                return out
            if isinstance(x, list):
                return [take(v) for v in x]
            if isinstance(x, tuple):
                items = [take(v) for v in x]
                return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
            return x

        return take(state_dict)

    # -- the background thread ---------------------------------------------------------------------

    def _write(self, p: ckpt.SavePaths, files: list, state_json: str, config_toml: str | None,
               model_config: str | None) -> None:
        try:
            for n, (write, copied, path) in enumerate(files):
                write(copied, path)
                if n == 0:
                    faults.hit("save-write", p.step, self.rank)
            written = [path for _, _, path in files]
            ckpt.write_rank_files(p, self.rank, state_json, config_toml, written, model_config)
            faults.hit("save-state", p.step, self.rank)
        except ckpt.CheckpointError:
            raise
        except (OSError, RuntimeError) as e:
            raise ckpt.save_error(e, p) from e

    def _commit(self, p: ckpt.SavePaths) -> None:
        try:
            ckpt.commit(p, self.keep, self.full_hashes)
        except ckpt.CheckpointError:
            raise
        except (OSError, RuntimeError) as e:
            raise ckpt.save_error(e, p) from e


def _lower_priority() -> None:
    """The writer thread yields the CPU to training: lowest priority for this thread only (Linux
    threads have their own nice value). Where the cores are busy with training (CPU runs) the write
    takes longer instead of slowing the steps; on GPU nodes the host cores are mostly idle anyway."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _done() -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(None)
    return f
