"""Adaptation benchmark: does the pretrained encoder help? One table, all twelve modalities.

    PYTHONPATH=. python bench/bench_adapt.py [--modalities image,text,...] [--epochs 20] [--seed 0]
        [--encoder EXPORT | --pretrain-steps N] [--markdown FILE] [--json FILE] [--work DIR]

For each modality it writes a small labelled data set in the files ``mtx-dist adapt`` reads
(docs/ADAPT.md), holds out a stratified test portion, and scores on that portion only:

(a) tokenizer + head trained by ``train_adapter`` on the frozen PRETRAINED encoder: the export of the
    quickstart, ``mtx-dist train run.dir=WORK/pretrain tracking.enabled=false`` (or ``--encoder``);
(a') the same with ``--tokenizer-init random``: what starting the tokenizer from the pretraining's
    stem (text, image, xray, infrared, video; ``mtx_dist.adapt.pretrained``) gives;
(b) the same on a frozen RANDOM encoder of the same preset (``export_encoder`` of a fresh model);
(c) a standard scikit-learn baseline on the raw features (named in the table).

The adapters pick their best epoch on a validation split of the training portion (``split``, as
``train_adapter`` does); the baseline is fitted on exactly the same training samples. Test scores
come from ``predict`` on the held-out files. Real data where a wheel ships it (scikit-learn's breast
cancer and digits); elsewhere generated (networkx's random-graph generators, simple class-dependent
signals): the "data" column says which. MLflow is off; torch runs on one thread (tiny models on a
shared 2-core CPU). All twelve take about 7-10 minutes on two cores, 3-6 of them the pretraining.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mtx_dist.adapt import MODALITIES, AdaptConfig, predict, train_adapter
from mtx_dist.adapt.data import split
from mtx_dist.config import TrackingConfig
from mtx_dist.export import MANIFEST_FILE, export_encoder
from mtx_dist.models import ContrastiveModel, get_preset

RATE = 8000  # audio sample rate (Hz)
KINDS = ("pretrained", "pretrained_random_tokenizer", "random")  # the adapters' columns


@dataclass
class Task:
    data: str                                   # "real: ..." or "generated: ..."
    items: list                                 # one raw sample each (array, text, graph)
    labels: list[str]
    write: Callable[[str, list, list], str]     # (folder, items, labels) -> the --data path
    features: Callable[[list], np.ndarray]      # items -> baseline inputs
    baseline: str
    model: Callable[[], object]                 # a fresh scikit-learn estimator
    opts: dict                                  # AdaptConfig options of this modality


def logreg():
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))


def one_nn():
    return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=1))


def bag_of_words():
    return make_pipeline(CountVectorizer(), LogisticRegression(max_iter=3000))


def flat(items: list) -> np.ndarray:
    return np.stack([np.asarray(x, np.float32).reshape(-1) for x in items])


# -- writing the files users have -------------------------------------------------------------------

def write_folder(save: Callable[[str, object], None], ext: str) -> Callable[[str, list, list], str]:
    """A writer of one file per sample plus ``labels.csv`` (whose row order is the sample order)."""
    def write(folder: str, items: list, labels: list) -> str:
        os.makedirs(folder)
        names = [f"{i:04d}{ext}" for i in range(len(items))]
        for name, item in zip(names, items):
            save(os.path.join(folder, name), item)
        with open(os.path.join(folder, "labels.csv"), "w", newline="") as f:
            csv.writer(f).writerows([("file", "label"), *zip(names, labels)])
        return folder
    return write


def write_table(header: list[str], row: Callable[[object], list]) -> Callable[[str, list, list], str]:
    """A writer of one CSV (``header`` + label), one ``row(item)`` per sample."""
    def write(folder: str, items: list, labels: list) -> str:
        os.makedirs(folder)
        path = os.path.join(folder, "data.csv")
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([[*header, "label"], *([*row(x), y] for x, y in zip(items, labels))])
        return path
    return write


def save_png(bits: int, rgb: bool = False) -> Callable[[str, np.ndarray], None]:
    from PIL import Image

    def save(path: str, img: np.ndarray) -> None:
        a = (img * (2 ** bits - 1)).round().astype(np.uint16 if bits == 16 else np.uint8)
        Image.fromarray(np.repeat(a[..., None], 3, 2) if rgb else a).save(path)
    return save


def save_wav(path: str, x: np.ndarray) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def save_graph(path: str, g) -> None:
    with open(path, "w") as f:
        json.dump({"nodes": [[float(d)] for _, d in sorted(g.degree())], "edges": [list(e) for e in g.edges()]}, f)


# -- the data sets ----------------------------------------------------------------------------------

def tabular(rng, args) -> Task:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return Task("real: sklearn breast cancer (Wisconsin)", list(d.data), [str(d.target_names[t]) for t in d.target],
                write_table(list(d.feature_names), lambda x: [f"{v:.6g}" for v in x]), flat, "LogReg", logreg, {})


def digits(data: str, save: Callable[[str, np.ndarray], None], invert: bool = False):
    """A task of 600 of scikit-learn's 8x8 digits (0..16), upsampled (bicubic) to ``--image-size`` px."""
    def task(rng, args, n: int = 600) -> Task:
        from PIL import Image
        from sklearn.datasets import load_digits

        d, size = load_digits(), args.image_size
        idx = rng.choice(len(d.target), n, replace=False)
        imgs = [np.asarray(Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8)).resize((size, size),
                                                                                             Image.BICUBIC)) / 255
                for i in idx]
        imgs = [1 - x if invert else x for x in imgs]  # inverted: bright background, dark strokes
        return Task(f"real: sklearn digits, {data}", imgs, [str(d.target[i]) for i in idx],
                    write_folder(save, ".png"), flat, "LogReg", logreg, {"image_size": args.image_size})
    return task


def timeseries(rng, args, n: int = 360, steps: int = 64) -> Task:
    """Sine, square or sawtooth wave: 1.5-4 cycles, random phase and amplitude, noise sd 0.6."""
    kinds, t, items = ("sine", "square", "sawtooth"), np.arange(steps) / steps, []
    for i in range(n):
        u = rng.uniform(1.5, 4) * t + rng.uniform()
        wave_ = {0: np.sin(2 * np.pi * u), 1: np.sign(np.sin(2 * np.pi * u)), 2: 2 * (u % 1) - 1}[i % 3]
        items.append(rng.uniform(0.5, 1.5) * wave_ + 0.6 * rng.standard_normal(steps))
    return Task("generated: sine/square/sawtooth + noise", items, [kinds[i % 3] for i in range(n)],
                write_table([f"t{k}" for k in range(steps)], lambda x: [f"{v:.4f}" for v in x]), flat,
                "1-NN (Euclidean)", one_nn, {"patch": 8})


def imu(rng, args, n: int = 360, steps: int = 64) -> Task:
    """6 channels (accelerometer xyz, gyroscope xyz) at 50 Hz: still, walking, running, turning."""
    kinds, t, items = ("still", "walk", "run", "turn"), np.arange(steps) / 50, []
    for i in range(n):
        x = 0.4 * rng.standard_normal((6, steps))
        x[2] += 1.0  # gravity
        kind, ph = kinds[i % 4], rng.uniform(0, 2 * np.pi)
        if kind in ("walk", "run"):
            f, a = (rng.uniform(1.5, 2.2), 0.8) if kind == "walk" else (rng.uniform(2.4, 3.2), 1.2)
            x[2] += a * np.sin(2 * np.pi * f * t + ph)
            x[0] += 0.4 * a * np.sin(4 * np.pi * f * t + ph)
        elif kind == "turn":
            x[5] += rng.choice([-1, 1]) * rng.uniform(0.8, 1.6) * np.sin(np.pi * t / t[-1])
        items.append(x.astype(np.float32))
    return Task("generated: still/walk/run/turn signals", items, [kinds[i % 4] for i in range(n)],
                write_folder(np.save, ".npy"), flat, "1-NN (Euclidean)", one_nn, {"patch": 8, "sample_rate": 50})


def audio(rng, args, n: int = 300) -> Task:
    """0.5 s at 8 kHz: a steady tone, a rising or a falling chirp (an octave), 400-1600 Hz, noise."""
    kinds, t, items = ("tone", "up", "down"), np.arange(RATE // 2) / RATE, []
    for i in range(n):
        f0, k = rng.uniform(400, 1600), i % 3
        f = {0: np.full_like(t, 1.5 * f0), 1: f0 * 2 ** (2 * t), 2: 2 * f0 * 2 ** (-2 * t)}[k]
        phase = 2 * np.pi * np.cumsum(f) / RATE + rng.uniform(0, 2 * np.pi)
        items.append(0.4 * np.sin(phase) + rng.uniform(0.05, 0.3) * rng.standard_normal(len(t)))
    return Task("generated: tone/up-chirp/down-chirp .wav", items, [kinds[i % 3] for i in range(n)],
                write_folder(save_wav, ".wav"), log_mel_features, "LogReg on log-mel", logreg,
                {"n_fft": 256, "hop": 128, "n_mels": 32, "patch": 8})


def log_mel_features(items: list) -> np.ndarray:
    """Flattened 32-band log-mel spectrograms (the project's filter bank, same STFT as the adapter)."""
    from mtx_dist.adapt.audio import log_mel, mel_filterbank

    x = torch.tensor(np.stack(items), dtype=torch.float32)
    return log_mel(x, mel_filterbank(RATE, 256, 32), 256, 128).reshape(len(items), -1).numpy()


def pointcloud(rng, args, n: int = 360, points: int = 256) -> Task:
    """Sphere, cube, cylinder or cone surfaces: random rotation, stretch and noise."""
    kinds, items = ("sphere", "cube", "cylinder", "cone"), []
    for i in range(n):
        kind = kinds[i % 4]
        if kind == "sphere":
            p = rng.standard_normal((points, 3))
            p /= np.linalg.norm(p, axis=1, keepdims=True)
        elif kind == "cube":
            p = rng.uniform(-1, 1, (points, 3))
            p[np.arange(points), rng.integers(3, size=points)] = rng.choice([-1.0, 1.0], points)
        else:
            a, h = rng.uniform(0, 2 * np.pi, points), rng.uniform(0, 1, points)
            r = np.ones(points) if kind == "cylinder" else 1 - h
            p = np.stack([r * np.cos(a), r * np.sin(a), 2 * h - 1], 1)
        rot = np.linalg.qr(rng.standard_normal((3, 3)))[0]
        p = (p * rng.uniform(0.8, 1.2, 3)) @ rot.T + 0.05 * rng.standard_normal((points, 3))
        items.append((p * rng.uniform(0.5, 2) + rng.normal(0, 1, 3)).astype(np.float32))
    return Task("generated: 4 surfaces, rotated + noise", items, [kinds[i % 4] for i in range(n)],
                write_folder(np.save, ".npy"), radius_histogram, "LogReg on radius histogram", logreg,
                {"points": 256, "groups": 16, "neighbours": 16})


def radius_histogram(items: list) -> np.ndarray:
    """Distances of the points from their centroid, over the largest: a rotation-invariant histogram."""
    out = []
    for p in items:
        r = np.linalg.norm(p - p.mean(0), axis=1)
        out.append(np.histogram(r / r.max(), bins=16, range=(0, 1))[0] / len(r))
    return np.stack(out)


def hyperspectral(rng, args, n: int = 360, size: int = 8, bands: int = 24) -> Task:
    """8x8-pixel, 24-band patches of 4 classes whose spectra peak 3 bands apart (width 3), noise."""
    b, items = np.arange(bands), []
    for i in range(n):
        spectrum = np.exp(-0.5 * ((b - (7 + 3 * (i % 4))) / 3.0) ** 2)
        items.append((rng.uniform(0.5, 1.5, (size, size, 1)) * spectrum
                      + rng.normal(0, 0.5, (size, size, bands))).astype(np.float32))
    return Task("generated: 4 overlapping spectra + noise", items, [f"class{i % 4}" for i in range(n)],
                write_folder(np.save, ".npy"), flat, "LogReg", logreg, {"band_group": 8})


def video(rng, args, n: int = 240, frames: int = 8) -> Task:
    """A bright square on noise that stays, moves left or moves right (2 px a frame)."""
    kinds, size, items = ("still", "left", "right"), args.image_size, []
    for i in range(n):
        clip, side = rng.uniform(0, 0.4, (frames, size, size)), size // 4
        y, x = rng.integers(0, size - side, 2)
        step = {0: 0, 1: -2, 2: 2}[i % 3]
        for f in range(frames):
            left = int(np.clip(x + step * (f - frames // 2), 0, size - side))
            clip[f, y:y + side, left:left + side] += 0.5
        items.append(np.repeat((np.clip(clip, 0, 1) * 255).astype(np.uint8)[..., None], 3, 3))
    return Task("generated: square still/left/right .npy clips", items, [kinds[i % 3] for i in range(n)],
                write_folder(np.save, ".npy"), lambda xs: flat([x[..., 0] for x in xs]), "LogReg", logreg,
                {"image_size": args.image_size, "frames": frames, "tubelet": 2})


TOPICS = {"sport": "goal match team coach league score player season",
          "weather": "rain storm wind cloud sunny forecast snow cold",
          "cooking": "oven recipe salt bake pasta sauce flour butter",
          "computing": "server code laptop bug compile memory network disk"}
FILLER = ("the", "a", "today", "near", "my", "big", "small", "old", "new", "very", "it", "was", "again", "later",
          "then", "quite")


def text(rng, args, n: int = 400) -> Task:
    """Short sentences: 2 words of their topic, half of them 1 word of another, 5 filler words."""
    names, items = list(TOPICS), []
    for i in range(n):
        topic = names[i % 4]
        words = list(rng.choice(TOPICS[topic].split(), 2, replace=False)) + list(rng.choice(FILLER, 5))
        if rng.uniform() < 0.5:
            words.append(rng.choice(TOPICS[names[(i + rng.integers(1, 4)) % 4]].split()))
        rng.shuffle(words)
        items.append(" ".join(words))
    return Task("generated: 4-topic sentences", items, [names[i % 4] for i in range(n)],
                write_table(["text"], lambda s: [s]), np.array, "LogReg on bag of words", bag_of_words,
                {"context_length": 16})


def graph(rng, args, n: int = 360, nodes: int = 12) -> Task:
    """networkx generators, 12 nodes, 20-24 edges: Erdos-Renyi G(n, m), Barabasi-Albert, Watts-Strogatz."""
    import networkx as nx

    kinds = ("erdos_renyi", "barabasi_albert", "watts_strogatz")
    make = (lambda s: nx.gnm_random_graph(nodes, 22, seed=s), lambda s: nx.barabasi_albert_graph(nodes, 2, seed=s),
            lambda s: nx.watts_strogatz_graph(nodes, 4, 0.3, seed=s))
    items = [make[i % 3](int(rng.integers(2**31))) for i in range(n)]
    return Task("generated: networkx ER / BA / WS graphs", items, [kinds[i % 3] for i in range(n)],
                write_folder(save_graph, ".json"), degree_histogram, "LogReg on degree histogram", logreg, {})


def degree_histogram(graphs: list) -> np.ndarray:
    return np.stack([np.bincount([d for _, d in g.degree()], minlength=12)[:12] for g in graphs]).astype(np.float32)


TASKS = {"timeseries": timeseries, "tabular": tabular, "audio": audio, "pointcloud": pointcloud,
         "image": digits("RGB .png", save_png(8, rgb=True)), "xray": digits("16-bit grey .png", save_png(16)),
         "infrared": digits("inverted 8-bit grey .png", save_png(8), invert=True), "hyperspectral": hyperspectral,
         "imu": imu, "video": video, "text": text, "graph": graph}
assert tuple(TASKS) == MODALITIES


# -- the encoders -----------------------------------------------------------------------------------

def pretrained_encoder(args, work: str) -> tuple[str, str]:
    """-> (export folder, a line on where it came from): ``--encoder``, or the quickstart trained now."""
    if args.encoder:
        return args.encoder, f"given export {args.encoder}"
    run_dir = os.path.join(work, "pretrain")
    if os.path.isfile(os.path.join(run_dir, "export", MANIFEST_FILE)):
        return os.path.join(run_dir, "export"), f"quickstart pretraining reused from {run_dir}"
    steps = [f"run.steps={args.pretrain_steps}"] if args.pretrain_steps else []
    cmd = [sys.executable, "-m", "mtx_dist", "train", f"run.dir={run_dir}", "tracking.enabled=false", *steps]
    log = os.path.join(work, "pretrain.log")
    print(f"pretraining: mtx-dist {' '.join(cmd[3:])} (log: {log}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:  # cwd=work: the demo shards are generated into work/data/demo
        if subprocess.run(cmd, cwd=work, stdout=f, stderr=subprocess.STDOUT, check=False).returncode:
            sys.exit(f"pretraining failed; see {log}")
    with open(log) as f:
        recall = re.search(r"image->text recall@1 [0-9.]+", f.read())
    origin = (f"quickstart pretraining ({args.pretrain_steps or 'default'} steps, {time.perf_counter() - start:.0f} s; "
              f"held-out {recall[0] if recall else 'recall not printed'})")
    return os.path.join(run_dir, "export"), origin


def random_encoder(pretrained: str, work: str, seed: int) -> tuple[str, str]:
    """A freshly initialised model of the pretrained export's preset, exported the same way."""
    with open(os.path.join(pretrained, MANIFEST_FILE)) as f:
        preset = json.load(f)["preset"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = ContrastiveModel.from_preset(preset).state_dict()
    out = os.path.join(work, "random-export")
    export_encoder(state, get_preset(preset), preset, out, {"init": "random", "seed": seed})
    return out, preset


# -- one modality -----------------------------------------------------------------------------------

def run_modality(modality: str, args, encoders: dict[str, str], work: str) -> dict:
    start = time.perf_counter()
    task = TASKS[modality](np.random.default_rng([args.seed, MODALITIES.index(modality)]), args)
    y = np.array(task.labels)
    pool, test = train_test_split(np.arange(len(y)), test_size=args.test_fraction, stratify=y,
                                  random_state=args.seed)
    folder = os.path.join(work, modality)
    shutil.rmtree(folder, ignore_errors=True)  # data and models of an earlier run in the same --work
    train_data = task.write(os.path.join(folder, "train"), [task.items[i] for i in pool], y[pool].tolist())
    test_data = task.write(os.path.join(folder, "test"), [task.items[i] for i in test], y[test].tolist())
    train_idx, val_idx = split(len(pool), args.val_fraction, args.seed)  # the adapter's own split
    classes, counts = np.unique(y[pool][train_idx], return_counts=True)
    row = {"modality": modality, "data": task.data, "train": len(train_idx), "val": len(val_idx), "test": len(test),
           "classes": len(np.unique(y)), "chance": round(float(np.mean(y[test] == classes[counts.argmax()])), 4),
           "baseline_name": task.baseline}

    x = task.features(task.items)
    model = task.model().fit(x[pool][train_idx], y[pool][train_idx])
    row["baseline"] = round(float(model.score(x[test], y[test])), 4)
    for kind, (encoder, init) in encoders.items():
        if init == "random" and row.get("pretrained_tokenizer_init") == "random":  # nothing to start from:
            row[kind] = row["pretrained"]  # the same run as the "pretrained" column, bit for bit
            continue
        cfg = AdaptConfig(encoder=encoder, modality=modality, data=train_data, out=os.path.join(folder, kind),
                          epochs=args.epochs, lr=args.lr, batch_size=32, val_fraction=args.val_fraction,
                          seed=args.seed, tokenizer_init=init, **task.opts)
        try:
            summary = train_adapter(cfg, TrackingConfig(enabled=False), progress=False)
            assert summary["train"] == len(train_idx), "the adapter split differently from the baseline"
            row[kind] = round(float(predict(cfg.out, test_data, device=cfg.device)["metrics"]["accuracy"]), 4)
            row[f"{kind}_val"], row[f"{kind}_best_epoch"] = summary["metrics"]["val_accuracy"], summary["best_epoch"]
            with open(os.path.join(cfg.out, "adapter.json")) as f:
                row[f"{kind}_tokenizer_init"] = json.load(f)["tokenizer"].get("init", "random")
        except Exception as e:  # noqa: BLE001 -- one broken modality should not hide the other eleven
            row[kind], row[f"{kind}_error"] = None, f"{type(e).__name__}: {e}"
            print(f"{modality} on the {kind} encoder failed: {row[f'{kind}_error']}", file=sys.stderr)
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{modality}: pretrained {row['pretrained']}, random {row['random']}, baseline {row['baseline']:.3f} "
          f"({row['seconds']} s)", file=sys.stderr, flush=True)
    return row


def standard_errors(rows: list[dict]) -> str:
    se = [math.sqrt(r[k] * (1 - r[k]) / r["test"]) for r in rows for k in (*KINDS, "baseline") if r[k] is not None]
    return f"One binomial standard error of these accuracies is at most {max(se):.3f}. " if se else ""


def init_note(rows: list[dict]) -> str:
    """Tokenizers that the pretrained export started from pretrained weights (text: the token embedding)."""
    warm = [f"{r['modality']} ({r['pretrained_tokenizer_init']})" for r in rows
            if r.get("pretrained_tokenizer_init", "random") != "random"]
    return f"On the pretrained export these tokenizers start from its weights: {', '.join(warm)}. " if warm else ""


def markdown(rows: list[dict], note: str) -> str:
    def acc(v):
        return "error" if v is None else f"{v:.3f}"

    lines = ["| modality | data | samples train+val/test | chance | pretrained encoder | pretrained encoder, random "
             "tokenizer | random encoder | baseline |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['modality']} | {r['data']} | {r['train']}+{r['val']}/{r['test']} | {r['chance']:.3f} | "
                     f"{acc(r['pretrained'])} | {acc(r['pretrained_random_tokenizer'])} | {acc(r['random'])} | "
                     f"{acc(r['baseline'])} ({r['baseline_name']}) |")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated (default: all twelve)")
    p.add_argument("--epochs", type=int, default=20, help="adapter epochs (the best on validation is kept)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32, help="image, xray, infrared, video: side in pixels")
    p.add_argument("--val-fraction", type=float, default=0.2, help="of the training portion, for epoch selection")
    p.add_argument("--test-fraction", type=float, default=0.25, help="held out, stratified, scored by all three")
    p.add_argument("--encoder", default="", help="an existing export instead of pretraining the quickstart now")
    p.add_argument("--pretrain-steps", type=int, default=0, help="run.steps of the pretraining (0: the quickstart's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--work", default="", help="folder for data, exports and models (default: a fresh temp folder)")
    p.add_argument("--markdown", default="", help="also write the table here")
    p.add_argument("--json", default="", help="write every number here")
    args = p.parse_args(argv)
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    unknown = [m for m in modalities if m not in TASKS]
    if unknown:
        p.error(f"unknown modalities {unknown}; choose from {', '.join(MODALITIES)}")
    torch.set_num_threads(args.threads)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench-adapt-"))
    os.makedirs(work, exist_ok=True)

    start = time.perf_counter()
    pretrained, origin = pretrained_encoder(args, work)
    random_export, preset = random_encoder(pretrained, work, args.seed)
    encoders = {"pretrained": (pretrained, "auto"), "pretrained_random_tokenizer": (pretrained, "random"),
                "random": (random_export, "auto")}
    rows = [run_modality(m, args, encoders, work) for m in modalities]
    seconds = time.perf_counter() - start
    note = (f"Accuracy on a stratified held-out test portion ({args.test_fraction:.0%}, seed {args.seed}) that no "
            f"model saw; adapters: {args.epochs} epochs, best epoch picked on a {args.val_fraction:.0%} validation "
            f"split of the rest, baselines fitted on the same training samples; chance = always the training "
            f"majority class. Encoder: preset {preset}, {origin}; random = the same preset freshly initialised. "
            f"{init_note(rows)}{standard_errors(rows)}"
            f"Total {seconds:.0f} s, torch {torch.__version__}, {args.threads} thread(s).")
    table = markdown(rows, note)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "note": note, "preset": preset, "encoder": pretrained, "encoder_origin": origin,
                       "seconds": round(seconds, 1), "torch": torch.__version__, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
