"""Reading users' files into tensors for adaptation: tables (tabular, time series) and the shared
parts (targets, split). Folder modalities (audio, point clouds, images) live in ``files.py``.

Every modality has the same three steps, so training and prediction share one code path:
``read`` (files -> :class:`Raw`), ``fit`` (training split only -> preprocessing statistics and
tokenizer settings, saved in ``adapter.json``) and ``transform`` (Raw + saved statistics -> tensor).

Time-series layout (one row per series, "wide"): columns ``t0 .. t{T-1}`` for one channel, or
``<channel>_t0 .. <channel>_t{T-1}`` for several; every channel has the same steps. Other columns
(ids, the target) are left out of the series and listed in the training summary.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mtx_dist.adapt.errors import DataError


@dataclass
class Raw:
    items: Sequence                # one raw input per sample (row dict, array, wave; files: see FileItems)
    targets: list | None           # raw target values, None where the data carries none
    ids: list[str]                 # row numbers or file paths, for the prediction file
    info: dict = field(default_factory=dict)  # what reading found (skipped rows, columns left out)

    def subset(self, idx) -> Raw:
        """The samples ``idx`` (decoded now where they were not kept in memory), with a fresh ``info``."""
        idx = [int(i) for i in idx]
        return Raw([self.items[i] for i in idx], None if self.targets is None else [self.targets[i] for i in idx],
                   [self.ids[i] for i in idx], {})


class FileItems(Sequence):
    """The samples of a folder: decoded arrays kept in memory up to a byte budget, the rest decoded again
    from their files on each access, so a folder larger than memory trains in the memory of a batch.
    (A plain list would hold every decoded file at once.)"""

    def __init__(self, files: list[str], load, kept: dict[int, object]) -> None:
        self.files, self.load, self.kept = files, load, kept

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        got = self.kept.get(k)
        return self.load(self.files[k]) if got is None else got


class Moments:
    """Per-feature mean and standard deviation of rows added chunk by chunk (the pairwise update of Chan,
    Golub and LeVeque), so the statistics of a training split never hold it in memory at once."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, rows: np.ndarray) -> None:
        """``rows``: (k, features); a 1-D array counts as k rows of one feature."""
        x = np.asarray(rows, np.float64)
        x = x.reshape(-1, 1) if x.ndim == 1 else x
        if not len(x):
            return
        mean, k = x.mean(0), len(x)
        delta, n = mean - self.mean, self.n + k
        self.m2 = self.m2 + ((x - mean) ** 2).sum(0) + delta ** 2 * (self.n * k / n)
        self.mean, self.n = self.mean + delta * (k / n), n

    def std(self, ddof: int = 0) -> np.ndarray:
        return np.sqrt(self.m2 / max(1, self.n - ddof))


class Inputs:
    """Model inputs of a :class:`Raw`'s samples, by index: ``inputs(idx) -> tensor``.

    Every sample passes the modality's ``transform`` once here, in chunks, so a sample that cannot be
    transformed fails before training and the reading counters (``clips_cropped``, ...) are totals.
    When all the inputs fit ``budget`` bytes they are kept from that pass (small data: the fastest);
    otherwise each call transforms its samples again (decoding files that were not kept in memory), so
    memory stays that of a batch whatever the size of the folder. Transforms are per sample, so both
    ways give the same tensors."""

    def __init__(self, io, raw: Raw, pre: dict, settings: dict, budget: int, chunk: int = 64) -> None:
        self.io, self.raw, self.pre, self.settings = io, raw, pre, settings
        parts: list | None = []
        size, totals = 0, {}
        for k in range(0, len(raw.items), chunk):
            sub = raw.subset(range(k, min(len(raw.items), k + chunk)))
            x = io.transform(sub, pre, settings)
            for key, v in sub.info.items():  # counters add up over the chunks
                totals[key] = totals.get(key, 0) + v if isinstance(v, (int, float)) else v
            size += x.nbytes
            if parts is not None and size <= budget:
                parts.append(x)
            else:
                parts = None
        raw.info.update(totals)
        self.kept = torch.cat(parts) if parts else None
        if self.kept is None:
            raw.info["inputs_transformed_per_batch"] = True

    def __len__(self) -> int:
        return len(self.raw.items)

    def __call__(self, idx) -> torch.Tensor:
        if self.kept is not None:
            return self.kept[torch.as_tensor(idx, dtype=torch.long)]
        return self.io.transform(self.raw.subset(idx), self.pre, self.settings)


def nbytes(item) -> int:
    """Memory of one decoded sample (an array, or a tuple of arrays such as a graph's)."""
    if isinstance(item, (tuple, list)):
        return sum(nbytes(x) for x in item)
    return int(getattr(item, "nbytes", 0))


MISSING = ("", "nan", "na", "n/a", "null", "none")  # how CSV writers spell an empty cell


def is_missing(v) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in MISSING) or (isinstance(v, float) and math.isnan(v))


def as_float(v, where: str) -> float:
    try:
        x = float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {v!r} is not a number") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: {v!r} is not a finite number")
    return x


def read_table(path: str) -> tuple[list[str], list[dict]]:
    """CSV (header row) or parquet -> (column names, rows as dicts)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist()
    if ext not in (".csv", ".tsv", ".txt"):
        raise DataError(f"{path}: expected a .csv or .parquet file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file (no header row)")
        rows = list(reader)
    return list(reader.fieldnames), rows


def _split_names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def read_rows(path: str, target: str, labelled: bool) -> tuple[list[str], list[dict], list | None, Raw]:
    """Rows of a table with the target separated; rows without a target are skipped (and counted)
    when training. -> (columns, rows, targets, Raw shell)."""
    columns, rows = read_table(path)
    if not rows:
        raise DataError(f"{path}: no data rows")
    has_target = target in columns
    if labelled and not has_target:
        raise DataError(f"{path}: no column {target!r} (the target); columns are: {', '.join(columns)}")
    ids = [str(i) for i in range(len(rows))]
    skipped = 0
    if labelled:
        keep = [i for i, r in enumerate(rows) if not is_missing(r[target])]
        skipped = len(rows) - len(keep)
        rows, ids = [rows[i] for i in keep], [ids[i] for i in keep]
        if not rows:
            raise DataError(f"{path}: every row lacks the target {target!r}")
    targets = [r[target] for r in rows] if has_target else None
    raw = Raw([], targets, ids, {"rows_without_target_skipped": skipped})
    return [c for c in columns if c != target], rows, targets, raw


class TabularIO:
    @staticmethod
    def read(path, cfg, labelled, pre=None) -> Raw:
        columns, rows, _, raw = read_rows(path, cfg.target, labelled)
        ignore = set(_split_names(cfg.ignore))
        unknown = ignore - set(columns)
        if unknown:
            raise DataError(f"{path}: --ignore names columns that do not exist: {', '.join(sorted(unknown))}")
        raw.items = rows
        if pre is None:
            raw.info["columns"] = [c for c in columns if c not in ignore]
            return raw
        raw.info["columns"] = [c["name"] for c in pre["numeric"] + pre["categorical"]]  # what the model uses
        absent = [c for c in raw.info["columns"] if c not in columns]
        if absent:
            raise DataError(f"{path}: columns the model was trained with are missing: {', '.join(map(repr, absent))}")
        return raw

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        categorical = set(_split_names(cfg.categorical))
        missing = categorical - set(raw.info["columns"])
        if missing:
            raise DataError(f"--categorical names columns that do not exist: {', '.join(sorted(missing))}")
        numeric, cats = [], []
        for col in raw.info["columns"]:
            values = [raw.items[i][col] for i in train_idx if not is_missing(raw.items[i][col])]
            if col not in categorical and values and all(_parses(v) for v in values):
                x = np.array([float(v) for v in values], dtype=np.float64)
                std = float(x.std())
                numeric.append({"name": col, "mean": float(x.mean()), "std": std if std > 0 else 1.0})
            else:
                cats.append({"name": col, "vocab": sorted({str(v) for v in values})})
        pre = {"numeric": numeric, "categorical": cats}
        return pre, {"n_numeric": len(numeric), "vocab_sizes": [len(c["vocab"]) + 1 for c in cats]}

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        out = np.zeros((len(raw.items), len(pre["numeric"]) + len(pre["categorical"])), dtype=np.float32)
        filled = unknown = 0
        vocabs = [{s: k + 1 for k, s in enumerate(col["vocab"])} for col in pre["categorical"]]
        for i, row in enumerate(raw.items):
            for j, col in enumerate(pre["numeric"]):
                v = row.get(col["name"]) if col["name"] in row else _absent(col["name"])
                if is_missing(v):
                    filled += 1  # the training mean, i.e. 0 after standardisation
                    continue
                out[i, j] = (as_float(v, f"row {raw.ids[i]}, column {col['name']!r}") - col["mean"]) / col["std"]
            for j, (col, ids) in enumerate(zip(pre["categorical"], vocabs), start=len(pre["numeric"])):
                v = row.get(col["name"]) if col["name"] in row else _absent(col["name"])
                out[i, j] = ids.get("" if v is None else str(v), 0)
                unknown += out[i, j] == 0
        raw.info.update(numeric_values_missing_filled_with_mean=filled, categorical_values_unknown=int(unknown))
        return torch.from_numpy(out)


def _absent(col: str):
    raise DataError(f"column {col!r} (a feature the model was trained with) is missing from the data")


def _parses(v) -> bool:
    try:
        return math.isfinite(float(v.strip() if isinstance(v, str) else v))
    except (TypeError, ValueError):
        return False


_STEP = re.compile(r"^(?:(?P<channel>.+)_)?t(?P<step>\d+)$")


class TimeSeriesIO:
    @staticmethod
    def layout(columns: list[str], path: str) -> tuple[list[str], int, list[str]]:
        """-> (channels in order of appearance, length T, columns left out)."""
        steps: dict[str, set[int]] = {}
        other = []
        for c in columns:
            m = _STEP.match(c)
            if m:
                steps.setdefault(m["channel"] or "", set()).add(int(m["step"]))
            else:
                other.append(c)
        if not steps:
            raise DataError(f"{path}: no time-step columns; expected t0..tN or <channel>_t0..<channel>_tN")
        length = max(len(s) for s in steps.values())
        for ch, s in steps.items():
            if s != set(range(length)):
                raise DataError(f"{path}: channel {ch or '(unnamed)'!r} has steps {sorted(s)[:5]}...; every "
                                f"channel needs t0..t{length - 1}")
        return list(steps), length, other

    @staticmethod
    def read(path, cfg, labelled, pre=None) -> Raw:
        columns, rows, _, raw = read_rows(path, cfg.target, labelled)
        channels, length, other = TimeSeriesIO.layout(columns, path)
        if pre is not None and (channels, length) != (pre["channels"], pre["length"]):
            raise DataError(f"{path}: channels {channels} x {length} steps; the model was trained on "
                            f"{pre['channels']} x {pre['length']}")
        names = [[f"{ch}_t{t}" if ch else f"t{t}" for ch in channels] for t in range(length)]
        x = np.empty((len(rows), length, len(channels)), dtype=np.float32)
        for i, row in enumerate(rows):
            for t, cols in enumerate(names):
                for c, name in enumerate(cols):
                    v = row[name]
                    if is_missing(v):
                        raise DataError(f"{path}: row {raw.ids[i]}, column {name!r} is empty; fill gaps first")
                    x[i, t, c] = as_float(v, f"{path}: row {raw.ids[i]}, column {name!r}")
        raw.items = list(x)
        raw.info.update(channels=channels, length=length, columns_not_in_series=other)
        return raw

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        x = np.stack([raw.items[i] for i in train_idx]).astype(np.float64)
        std = x.std(axis=(0, 1))
        pre = {"channels": raw.info["channels"], "length": raw.info["length"], "mean": x.mean(axis=(0, 1)).tolist(),
               "std": np.where(std > 0, std, 1.0).tolist()}
        patch = cfg.patch or 16
        return pre, {"length": raw.info["length"], "channels": len(raw.info["channels"]), "patch": patch}

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        x = np.stack(raw.items)
        return torch.from_numpy(((x - np.array(pre["mean"])) / np.array(pre["std"])).astype(np.float32))


def encode_targets(targets: list, task: str, train_idx: list[int]) -> tuple[torch.Tensor, dict]:
    """Training targets -> (tensor, saved target stats): class ids over the sorted class names, or
    regression values standardised with the training split's mean and std."""
    if task == "classification":
        classes = sorted({str(t) for t in targets})
        if len(classes) < 2:
            raise DataError(f"classification needs at least 2 classes; the data has {classes}")
        index = {c: k for k, c in enumerate(classes)}
        return torch.tensor([index[str(t)] for t in targets]), {"classes": classes}
    y = np.array([as_float(t, f"target of sample {k}") for k, t in enumerate(targets)], dtype=np.float64)
    mean, std = float(y[train_idx].mean()), float(y[train_idx].std())
    std = std if std > 0 else 1.0
    return torch.from_numpy(((y - mean) / std).astype(np.float32)), {"mean": mean, "std": std}


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded shuffle into (train, validation) indices; at least one of each when val_fraction > 0."""
    if n < 2 and val_fraction > 0:
        raise DataError(f"{n} labelled sample(s): too few to split into training and validation")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(n - 1, max(1, round(val_fraction * n))) if val_fraction > 0 else 0
    return sorted(perm[n_val:]), sorted(perm[:n_val])
