"""bench/gpu_suite.sh --smoke: every code path of the one-shot GPU suite, on CPU at micro sizes.

The suite itself runs once on a lent GPU machine; this keeps it from rotting in between: the script must
finish, exit 0, and write a table with every section and row, each with finite numbers.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import DIST_VARS, REPO

SCRIPT = os.path.join(REPO, "bench", "gpu_suite.sh")


def _sections(md: str) -> dict[str, list[list[str]]]:
    """Section title -> table rows (cells), header and separator rows left out."""
    out: dict[str, list[list[str]]] = {}
    title = None
    for line in md.splitlines():
        if line.startswith("## "):
            title, seen_header = line[3:].strip(), False
            out[title] = []
        elif title and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not seen_header:
                seen_header = True
            elif not set(line) <= set("|-"):
                out[title].append(cells)
    return out


def _finite(cell: str) -> bool:
    try:
        return math.isfinite(float(cell.replace(",", "")))
    except ValueError:
        return False


def _row(rows: list[list[str]], label: str, col: int = 0) -> list[str]:
    found = [r for r in rows if r[col].startswith(label)]
    assert found, f"no row {label!r} in {rows}"
    return found[0]


def _section(secs: dict, number: str) -> list[list[str]]:
    found = [rows for title, rows in secs.items() if title.startswith(number + ".")]
    assert found, f"no section {number} in {list(secs)}"
    return found[0]


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "table.md"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run(["bash", SCRIPT, "--smoke", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    md = out.read_text()
    assert md in proc.stdout  # printed as well
    assert "error:" not in md and "skipped" not in md, md
    for key in ("- device:", "torch ", "triton ", "deepspeed ", "- date:", "- command:", "--smoke"):
        assert key in md
    secs = _sections(md)

    train = _section(secs, "1")
    for name in ("baseline", "+trim", "+FLIP 0.5", "+low-res", "+compile", "all"):
        row = _row(train, name)
        # samples/s, ms/step, model TFLOP/s, loss; compile time where compiled
        assert all(_finite(row[i]) for i in (2, 3, 4, 8)), row
        assert _finite(row[7]) == ("compile" in name or name == "all"), row
    full, trimmed, flip, low = (_row(train, n)[1] for n in ("baseline", "+trim", "+FLIP 0.5", "+low-res"))
    assert int(trimmed.split("/")[1]) < int(full.split("/")[1])  # text tokens
    assert int(flip.split("/")[0]) < int(full.split("/")[0])  # image tokens
    assert int(low.split("/")[0]) == 1 + 2 * 2 < int(full.split("/")[0]) == 1 + 4 * 4  # micro: 32 -> 16 px

    attn = _section(secs, "2")
    for shape in ("vit-b16", "vit-l14"):
        for backend in ("sdpa-flash", "sdpa (torch picks", "triton"):
            row = next(r for r in attn if r[0].startswith(shape) and r[1].startswith(backend))
            assert all(_finite(c) for c in row[3:8]), row  # errors, ms, TFLOP/s, ratio
            assert float(row[3]) < 1e-4 and float(row[4]) < 1e-4, row  # fp32 on CPU
            assert row[8].startswith("err ok"), row
        fa = next(r for r in attn if r[0].startswith(shape) and r[1] == "flash_attn")
        assert fa[2] == "not installed" or _finite(fa[6]), fa

    loss = _section(secs, "3")
    plain, tiled = _row(loss, "plain"), _row(loss, "tiled")
    assert _finite(plain[4]) and _finite(tiled[4])
    assert abs(float(plain[5]) - float(tiled[5])) <= 1e-4 * abs(float(plain[5]))

    dali = _section(secs, "4")
    if importlib.util.find_spec("nvidia.dali") is None:
        assert dali[0][1] == "DALI not installed"
    else:
        assert _finite(_row(dali, "cpu")[1]), dali


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(REPO, "bench", "gpu_suite.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_gpu_suite_section_failure_is_a_row_and_fails_smoke(tmp_path, monkeypatch, capsys):
    suite = _suite()

    def broken(args, sec):
        raise ValueError("boom")

    monkeypatch.setattr(suite, "run_dali", broken)
    out = tmp_path / "t.md"
    assert suite.main(["--smoke", "--sections", "3,4", "--out", str(out)]) == 1  # smoke: an error fails the run
    md = out.read_text()
    assert "error: ValueError: boom" in md and "not requested (--sections)" in md
    assert "| plain |" in md  # the other section still ran
    assert "Traceback" in capsys.readouterr().err
    assert suite.main(["--sections", "4", "--device", "cpu", "--out", str(out)]) == 0  # not smoke: reported only


def test_gpu_suite_budget_skips(tmp_path):
    out = tmp_path / "t.md"
    assert _suite().main(["--smoke", "--budget-s", "0", "--out", str(out)]) == 0
    assert out.read_text().count("skipped: budget") == 4
