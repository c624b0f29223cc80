"""Run a function on N local processes joined by a gloo process group, with a hard timeout (tests,
benchmarks and single-machine experiments; jobs use torchrun, the deepspeed launcher or SLURM).

``run_ranks(world, fn, *args)`` spawns ``world`` fresh interpreters, sets the launcher variables
torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...), starts the default gloo group with a
timeout, calls ``fn(*args)`` (a module-level function) and returns every rank's return value.
A rank that raises fails the call with its traceback; a hang is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import traceback

from mtx_launchers.env import DIST_VARS, free_port

COLLECTIVE_TIMEOUT_S = 120


def _entry(rank: int, world: int, port: int, fn, args, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    try:
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        results.put((rank, "ok", fn(*args)))
        dist.destroy_process_group()
    except BaseException:  # report everything, including SystemExit from a ConfigError path
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(world: int, fn, *args, timeout: float = 300) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    saved = {k: os.environ.pop(k) for k in DIST_VARS if k in os.environ}  # not inherited by the children
    try:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, results))
                 for r in range(world)]
        for p in procs:
            p.start()
    finally:
        os.environ.update(saved)
    out: dict[int, object] = {}
    errors = []
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(out) + len(errors) < world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, status, value = results.get(timeout=max(left, 0.1))
            except queue.Empty:
                raise TimeoutError(f"{world - len(out) - len(errors)} rank(s) of {fn.__name__} did not finish "
                                   f"in {timeout:.0f} s") from None
            if status == "ok":
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the others are probably blocked in a collective with the failed rank
        if errors:
            raise RuntimeError(f"{fn.__name__} failed on\n" + "\n".join(errors))
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]
