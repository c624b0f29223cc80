"""SLURM's compressed host and task lists, node addresses and requeue. Standard library only.

``parse_nodelist`` expands what ``scontrol show hostnames`` expands, without needing scontrol (it
is not on every login or container image): ``n[1-2]``, ``gpu-[001-004,010],cpu7``,
``a[01-02]b[1-2]`` (several bracket groups: every combination), ``rack1-n[3,5]-ib``.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

SCONTROL_TIMEOUT_S = 10.0


class NodelistError(ValueError):
    """A SLURM host or task list that cannot be parsed."""


def _split_top(text: str) -> list[str]:
    """Split at commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise NodelistError(f"nested brackets in node list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise NodelistError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise NodelistError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_ranges(spec: str, whole: str) -> list[str]:
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise NodelistError(f"bad range {item!r} in node list {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise NodelistError(f"range {item!r} in node list {whole!r} runs backwards")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0  # zero padding is kept: 001-004
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(expr: str, whole: str) -> list[str]:
    start = expr.find("[")
    if start < 0:
        if "]" in expr:
            raise NodelistError(f"unbalanced ']' in node list {whole!r}")
        return [expr]
    end = expr.index("]", start)
    head, tail = expr[:start], _expand_host(expr[end + 1:], whole)
    return [head + n + t for n in _expand_ranges(expr[start + 1:end], whole) for t in tail]


def parse_nodelist(text: str) -> list[str]:
    """``"gpu-[001-002,010],cpu7"`` -> ``["gpu-001", "gpu-002", "gpu-010", "cpu7"]`` (SLURM's order)."""
    text = text.strip()
    if not text:
        raise NodelistError("empty node list")
    hosts = []
    for part in _split_top(text):
        part = part.strip()
        if not part:
            raise NodelistError(f"empty entry in node list {text!r}")
        hosts.extend(_expand_host(part, text))
    return hosts


def parse_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out = []
    for item in text.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise NodelistError(f"bad tasks-per-node entry {item!r} in {text!r} (expected N or N(xM))")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def node_address(node: str, timeout: float = SCONTROL_TIMEOUT_S) -> str | None:
    """The address other nodes reach ``node`` at: its NodeAddr from ``scontrol show node`` (node names
    need not resolve, e.g. several slurmd on one host), else the name's DNS address; None if neither."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True,
                                 timeout=timeout).stdout
            m = re.search(r"\bNodeAddr=(\S+)", out)
            if m and m.group(1) not in ("(null)", ""):
                return m.group(1)
        except (OSError, subprocess.TimeoutExpired):
            pass  # fall through to DNS
    try:
        return socket.gethostbyname(node)
    except OSError:
        return None


def port_for_job(job_id: str | int) -> int:
    """A rendezvous port every task of a job derives alike without talking to the others."""
    return 20000 + int(job_id) % 20000


def requeue(job_id: str, timeout: float = SCONTROL_TIMEOUT_S) -> tuple[bool, str]:
    """``scontrol requeue JOB``: (succeeded, what scontrol said or why it could not run)."""
    if not shutil.which("scontrol"):
        return False, "scontrol is not on PATH"
    try:
        p = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"scontrol requeue {job_id} did not answer in {timeout:.0f} s"
    except OSError as e:
        return False, f"scontrol requeue {job_id}: {e}"
    said = (p.stdout + p.stderr).strip()
    return p.returncode == 0, said or f"scontrol requeue {job_id}: exit code {p.returncode}"
