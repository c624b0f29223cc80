"""``mtx-dist launch``: the deepspeed-launcher or torchrun command for a hostfile or a SLURM allocation.

Printing the command is the default; ``--run`` replaces this process with it. Everything after
``--`` goes to ``mtx-dist`` on every rank (``-- train cfg.toml --resume latest``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from mtx_launchers.command import LAUNCHERS, execute, format_hostfile, plan_from_environment, render
from mtx_launchers.env import LaunchEnvError


def _write_atomically(path: str, text: str) -> None:
    # Every node of an allocation may write the same file on a shared filesystem: rename, never truncate.
    from mtx_data_pipelines.files import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


def _run(args: argparse.Namespace) -> int:
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if not train_args:
        raise LaunchEnvError("nothing to launch: give the mtx-dist arguments after '--' (e.g. -- train cfg.toml)")
    generated = args.hostfile is None and args.launcher == "deepspeed"
    write_to = args.write_hostfile
    if generated and write_to is None:
        job = os.environ.get("SLURM_JOB_ID", "local")
        write_to = os.path.join(tempfile.gettempdir(), f"mtx-dist-hostfile-{job}")
    plan = plan_from_environment(args.launcher, train_args, os.environ, hostfile=args.hostfile,
                                 write_hostfile=write_to, nproc_per_node=args.nproc_per_node,
                                 node_rank=args.node_rank, master_addr=args.master_addr,
                                 master_port=args.master_port)
    if generated:
        _write_atomically(plan.hostfile, format_hostfile(plan.hosts))
        print(f"# hostfile {plan.hostfile}: " + ", ".join(f"{h.name} slots={h.slots}" for h in plan.hosts),
              file=sys.stderr)
    if not args.run:
        print(render(plan))
        return 0
    print(f"mtx-dist launch (node {plan.node_rank} of {len(plan.hosts)}): {render(plan)}", file=sys.stderr)
    execute(plan)
    return 0  # not reached: execute replaces the process


def register(sub) -> None:
    p = sub.add_parser("launch", help="build (and with --run start) the deepspeed/torchrun command for a "
                       "hostfile or the current SLURM allocation",
                       description="Print the launcher command that starts `mtx-dist ARGS` on every rank of this "
                       "node; --run executes it. Hosts come from --hostfile (lines 'host slots=N') or from "
                       "the SLURM allocation (SLURM_JOB_NODELIST; slots = --nproc-per-node, else GPUs per node, "
                       "else 1). Run it once per node (srun --ntasks-per-node=1 under SLURM): no ssh is needed.")
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed", help="which launcher (default deepspeed)")
    p.add_argument("--hostfile", metavar="FILE", help="hosts and slots; default: the SLURM allocation")
    p.add_argument("--write-hostfile", metavar="PATH", help="where the hostfile generated from SLURM is written "
                   "for the deepspeed launcher (default: $TMPDIR/mtx-dist-hostfile-$SLURM_JOB_ID)")
    p.add_argument("--nproc-per-node", type=int, metavar="N", help="ranks per node (overrides slots)")
    p.add_argument("--node-rank", type=int, metavar="K", help="this node's index (default: SLURM_NODEID, else 0)")
    p.add_argument("--master-addr", help="address of the first node (default: MASTER_ADDR, else its NodeAddr/DNS)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: MASTER_PORT, else derived from "
                   "SLURM_JOB_ID, else 29500)")
    p.add_argument("--run", action="store_true", help="execute the command instead of printing it")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- followed by the mtx-dist arguments of each rank")
    p.set_defaults(func=_run)
