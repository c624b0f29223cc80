"""A real SLURM cluster on this host: munged, slurmctld and two slurmd "nodes" (n1, n2) on 127.0.0.1.

Everything lives in one directory (config, keys, sockets, state, logs); ports are chosen free. The
daemons run as root without systemd. :meth:`Cluster.stop` shuts them down by their pid files.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time

from mtx_launchers.env import DIST_VARS

BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged", "mungekey")
INSTALL_HINT = ("SLURM is not installed: run `bash install.sh test` as root (it runs `apt-get install -y "
                "--no-install-recommends slurm-wlm munge`), or install those two Debian packages yourself")
NODES = ("n1", "n2")
CMD_TIMEOUT_S = 30


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    def __init__(self, root: str) -> None:
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_socket = os.path.join(root, "munge", "munge.socket.2")
        # the daemons and every job inherit this: no launcher variables of the test process's own runs
        self.env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "SLURM_CONF": self.conf}
        self._pid_files = [os.path.join(root, "slurmctld.pid")] + [os.path.join(root, f"slurmd-{n}.pid")
                                                                   for n in NODES]

    # -- start --------------------------------------------------------------------------------------

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            "ClusterName=mtxtest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd-%n.log",
            "MailProg=/bin/true", "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2",
            "JobRequeue=1", "MinJobAge=600", "KillWait=5", "InactiveLimit=0", "SlurmdTimeout=60",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        ]
        for node in NODES:
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs=2 "
                         f"RealMemory=4000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _run(self, *args: str, timeout: float = CMD_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def start(self, timeout: float = 60) -> None:
        r = self.root
        for d in ("munge", "state", *(f"spool/{n}" for n in NODES)):
            os.makedirs(os.path.join(r, d), exist_ok=True)
        os.chmod(os.path.join(r, "munge"), 0o755)
        key = os.path.join(r, "munge", "munge.key")
        self._run(_exe("mungekey"), "--create", f"--keyfile={key}")
        os.chmod(key, 0o400)
        self._run(_exe("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                  f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/munge/munged.log",
                  f"--seed-file={r}/munge/munged.seed")
        self._write_conf()
        self._run(_exe("slurmctld"), "-f", self.conf)
        for node in NODES:
            self._run(_exe("slurmd"), "-f", self.conf, "-N", node)
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            p = self._run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
            states = p.stdout.strip()
            if p.returncode == 0 and len(re.findall(r"\bidle\b", states)) == len(NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes not idle after {timeout:.0f} s (sinfo: {states!r}); logs in {r}")

    # -- use ----------------------------------------------------------------------------------------

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        p = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, capture_output=True,
                           text=True, timeout=CMD_TIMEOUT_S)
        if p.returncode:
            raise RuntimeError(f"sbatch failed: {p.stderr}")
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self._run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, until, timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll the job until ``until(info)`` holds; raises TimeoutError with its last state."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")

    def scontrol(self, *args: str) -> str:
        return self._run("scontrol", *args).stdout

    def scancel(self, *args: str) -> None:
        self._run("scancel", *args)

    # -- stop ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        try:  # jobs a failed test left running: their processes would outlive the daemons
            self._run("scancel", f"--user={getpass.getuser()}", check=False, timeout=15)
            deadline = time.monotonic() + 20
            while self._run("squeue", "-h", check=False, timeout=10).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            self._run("scontrol", "shutdown", check=False, timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            pass
        deadline = time.monotonic() + 15
        for pid_file in self._pid_files:  # daemons that did not leave after the shutdown request
            try:
                pid = int(open(pid_file).read().strip())
            except (OSError, ValueError):
                continue
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        try:  # munged is not told by scontrol: stop it by its pid
            os.kill(int(open(os.path.join(self.root, "munge", "munged.pid")).read().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
