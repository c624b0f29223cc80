"""Race: OpenCLIP's own trainer against ``mtx-dist train``, to the same held-out accuracy.

What is compared. Both sides train the same geometry (the ``tiny`` preset; OpenCLIP gets it as
``--model local-dir:DIR`` from the ``open_clip_config.json`` that our open_clip export writes) from
the same initial weights (``--init same``, the default: our model as initialised under the run's seed,
exported for OpenCLIP, which loads the folder's weights, and given to ours as ``model.init_from``; the
draw of the initial weights alone moves the hard set's final metric by ~0.03, so unpaired sides
compare draws as much as trainers; ``--init own``: each side its own random init) on the same shards,
one run after the other,
with the same batch (64), AdamW (lr, wd 0.1, betas 0.9/0.98, eps 1e-6), linear warmup then cosine
to zero over the same number of steps, gradient clipping at 1.0, fp32, 2 loader workers with
OpenCLIP's sample shuffle buffer (5000; ``--shuffle-buffer``), resampled
shards, seed 0, and 2 torch threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for both, plus
``torch.set_num_threads`` in OpenCLIP's launcher). OpenCLIP runs in its own venv (webdataset 0.2.86,
which its WebDataset pipeline needs; torch, torchvision and open_clip are this environment's,
seen through ``--system-site-packages``). Ours runs as ``python -m mtx_dist.cli train`` in variants:
``baseline`` (every speed technique off), each technique alone, and ``all`` (see ``TECHNIQUES``).
``trim+bf16mm`` lets ours' fp32 matmuls use bf16 products (``parallel.matmul_precision=medium``, the
CPU counterpart of the TF32 OpenCLIP turns on for its GPU fp32 runs): a different precision, so not
the race's like-for-like rows; OpenCLIP stays at exact fp32, its faster setting on a CPU (its SDPA
attention slows down under bf16 matmuls: ``bench/bench_step.py --matmul-precision medium``).

Data sets (``bench/race_data.py``): ``demo`` (the quickstart's shards; held out: 4 pools of its 240
distinct scenes) and ``hard`` (two objects per image, compositional captions; 3 pools of 400 distinct
scenes).

The judge. Every checkpoint of every side is scored by OpenCLIP's own code in the OpenCLIP venv
(``bench/race_openclip_env.py judge``): ours exported to an OpenCLIP folder (the code path of
``mtx-dist export CKPT --format open_clip``) and built with ``open_clip.create_model('local-dir:..')``,
OpenCLIP's ``epoch_K.pt`` loaded into the same geometry with ``open_clip.load_checkpoint``; OpenCLIP's
eval preprocessing and tokenizer, then ``open_clip_train.train.get_clip_metrics`` within each pool
(no two captions of a pool describe the same scene). The metric is the mean of image->text and
text->image recall@1, averaged over the pools.

How time is counted. ``wall s`` is the trainer process from ``Popen`` to exit (interpreter start,
imports, model build, loader start, training, checkpoint writes). A checkpoint's time is its file's
mtime minus that ``Popen`` time: ours ``checkpoints/stepN/checkpoint.json`` (written last, just
before the directory is renamed into place), OpenCLIP's ``checkpoints/epoch_K.pt``; so it includes
start-up and every earlier checkpoint write, on both sides. OpenCLIP checkpoints once per "epoch",
so an epoch is made K steps long (``--train-num-samples 64*K --epochs steps/K``); its loader
restarts its shuffle buffer each epoch, which is part of its time. Exports and judging happen after
a run has ended and are not counted. ``time to target`` is when a side first reaches OpenCLIP's final
metric, linearly interpolated between the two checkpoints around the crossing ("<=" when already the
first checkpoint is past it, "-" when never reached); speed-up = OpenCLIP's time to its own final
metric / that time (">=" when that time is a "<=" bound). ``samples/s`` is steady state: the median
of the logged per-window rates (ours: the trainer's ``sps`` every 10 steps; OpenCLIP: 64 / its window
``Batch (t)`` average), leaving out ours' first window and OpenCLIP's first line of each epoch (one
batch, loader start).

    PYTHONPATH=. python bench/bench_race.py --quick                       # smoke run of everything
    PYTHONPATH=. python bench/bench_race.py --seeds 2 --variants text_trim,trim+flip  # mean of 2 seeds per side
    PYTHONPATH=. python bench/bench_race.py [--datasets demo,hard] [--variants baseline,all] \
        [--steps 200] [--every 40] [--json race.json] [--markdown race.md]

Numbers on a shared machine move with its load; the sides run one after the other, so compare runs
of one invocation only. One seed decides little here: the final metric of one side moves by about
0.02 from seed to seed (OpenCLIP's hard set: 0.179 and 0.203 in two runs of seed 0, its loader
being unseeded), as much as the differences raced for. ``--seeds N`` runs every side N times (seed
k for both trainers) and scores the mean curve; the table lists each seed's final metric, the
wall-clock ratio at equal steps (OpenCLIP's mean wall-clock / the side's) and the side's final metric
minus OpenCLIP's, paired by seed (same initial weights), as a mean with its standard error: a
difference within about two standard errors is the seeds' noise, not the trainer's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from importlib.metadata import version

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path[:0] = [REPO, BENCH]

from race_data import make_dataset  # noqa: E402
from race_score import Point, Side, merge_seeds, score_race, table  # noqa: E402

from mtx_launchers.env import DIST_VARS  # noqa: E402

OPENCLIP_WEBDATASET = "0.2.86"  # open_clip_train's group_by_keys_nothrow breaks on webdataset 1.x
BATCH, WORKERS, PRESET = 64, 2, "tiny"
OPENCLIP_SHUFFLE = 5000  # open_clip_train.data._SAMPLE_SHUFFLE_SIZE (its initial fill: 1000; ours: 100)
# speed technique -> (config key, value when on, value when off)
TECHNIQUES: dict[str, tuple[str, str, str]] = {
    "text_trim": ("data.text_trim", "true", "false"),
    "patch_dropout": ("model.patch_dropout", "0.5", "0.0"),
    "compile": ("run.compile", "true", "false"),
    "low_res": ("model.train_image_size", "48", "0"),  # CLIPA: 64 px -> 48 px, 6 x 6 instead of 8 x 8 patches
    # bf16 products inside fp32 matmuls (AMX/AVX512-BF16 CPUs; TF32 on GPUs, which OpenCLIP turns on there)
    "bf16_matmul": ("parallel.matmul_precision", "medium", "highest"),
}
# our variant -> the techniques it turns on (every other one is explicitly off)
VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "text_trim": ("text_trim",),
    "patch_dropout": ("patch_dropout",),
    "compile": ("compile",),
    "low_res": ("low_res",),
    "trim+flip": ("text_trim", "patch_dropout"),  # compile's start-up does not pay off in short runs
    "trim+lowres": ("text_trim", "low_res"),
    "trim+lowres+flip": ("text_trim", "low_res", "patch_dropout"),
    "trim+bf16mm": ("text_trim", "bf16_matmul"),
    "all": tuple(TECHNIQUES),
}
DATASETS = {  # name -> (train samples, distinct scenes per held-out pool, pools)
    "demo": (8192, 240, 4),
    "hard": (8192, 400, 3),
}




def say(msg: str) -> None:
    print(f"[race {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=REPO,
               MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false")
    return env


# --- the OpenCLIP venv ---------------------------------------------------------------------------

def ensure_venv(path: str) -> str:
    """The venv's python: created once (``--system-site-packages``, so torch is ours by construction)
    with webdataset==0.2.86 inside, shadowing ours; whatever OpenCLIP's trainer needs and this
    environment lacks is installed with torch pinned to our version (torchvision without deps: its
    PyPI wheel is a CUDA build, only its Python side is used)."""
    py = os.path.join(path, "bin", "python")
    want = {"torch": version("torch"), "webdataset": OPENCLIP_WEBDATASET}
    marker = os.path.join(path, "race-ready.json")
    if os.path.exists(marker) and os.path.exists(py):
        with open(marker) as f:
            if json.load(f) == want:
                return py
    say(f"creating the OpenCLIP venv at {path}")
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", path], check=True)
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    constraints = os.path.join(path, "constraints.txt")
    with open(constraints, "w") as f:
        f.write(f"torch=={want['torch']}\n")  # any other torch spec would pull CUDA wheels
    subprocess.run(pip + ["--no-deps", f"webdataset=={OPENCLIP_WEBDATASET}"], check=True)
    needs = {"open_clip_train": "open_clip_torch", "pandas": "pandas", "braceexpand": "braceexpand",
             "yaml": "pyyaml", "ftfy": "ftfy", "regex": "regex"}
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    missing = subprocess.run([py, "-c", probe, "torchvision", *needs], capture_output=True, text=True,
                             check=True).stdout.split()
    if "torchvision" in missing:
        major, minor = want["torch"].split("+")[0].split(".")[:2]
        tv = f"0.{int(minor) + 15}.*" if major == "2" else ""  # torchvision 0.(m+15) goes with torch 2.m
        subprocess.run(pip + ["--no-deps", f"torchvision=={tv}" if tv else "torchvision"], check=True)
    rest = [needs[m] for m in missing if m in needs]
    if rest:
        subprocess.run(pip + ["-c", constraints, *rest], check=True)
    got = json.loads(subprocess.run([py, os.path.join(BENCH, "race_openclip_env.py"), "versions"],
                                    capture_output=True, text=True, check=True).stdout)
    if got["torch"] != want["torch"] or got["webdataset"] != OPENCLIP_WEBDATASET:
        raise SystemExit(f"OpenCLIP venv {path}: got {got}, need {want}")
    with open(marker, "w") as f:
        json.dump(want, f)
    return py


# --- the two trainers ----------------------------------------------------------------------------

def geometry_dir(root: str) -> str:
    """A folder with only our open_clip export's ``open_clip_config.json`` for the preset: OpenCLIP
    builds the geometry from it and, finding no weights, keeps its own random init."""
    out = os.path.join(root, "geometry")
    if not os.path.exists(os.path.join(out, "open_clip_config.json")):
        from mtx_dist.export.writers import write_export
        from mtx_dist.models import ContrastiveModel, get_preset

        spec = get_preset(PRESET)
        full = os.path.join(root, "geometry-export")
        write_export(ContrastiveModel(spec).state_dict(), spec, PRESET, full, {}, ["open_clip"])
        os.makedirs(out, exist_ok=True)
        shutil.copy(os.path.join(full, "open_clip_config.json"), out)
        shutil.rmtree(full)
    return out


def init_dir(root: str, seed: int) -> str:
    """Our ``tiny`` model as initialised under ``seed``, as an open_clip export: both sides start from it."""
    out = os.path.join(root, f"init-seed{seed}")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        import torch

        from mtx_dist.export.writers import write_export
        from mtx_dist.models import ContrastiveModel, get_preset

        torch.manual_seed(seed)
        spec = get_preset(PRESET)
        write_export(ContrastiveModel(spec).state_dict(), spec, PRESET, out, {"init_seed": seed}, ["open_clip"])
    return out


def timed(cmd: list[str], log: str, env: dict[str, str], cwd: str) -> tuple[float, float, int]:
    """Run ``cmd`` with stdout+stderr into ``log``; returns (start time, wall seconds, exit code)."""
    with open(log, "w") as f:
        t0 = time.time()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    return t0, time.time() - t0, rc


def tail(path: str, n: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "\n".join(f.read().replace("\r", "\n").splitlines()[-n:])


def run_openclip(side: Side, py: str, a: argparse.Namespace, train: str, geometry: str, work: str) -> None:
    logs = os.path.join(work, "logs")
    shutil.rmtree(logs, ignore_errors=True)
    epochs = a.steps // a.every
    cmd = [py, os.path.join(BENCH, "race_openclip_env.py"), "train", "--threads", str(a.threads), "--",
           "--model", f"local-dir:{side.init or geometry}", "--train-data", train, "--dataset-type", "webdataset",
           "--dataset-resampled", "--train-num-samples", str(BATCH * a.every), "--epochs", str(epochs),
           "--batch-size", str(BATCH), "--workers", str(WORKERS), "--precision", "fp32", "--device", "cpu",
           "--lr", str(a.lr), "--warmup", str(a.warmup), "--lr-scheduler", "cosine", "--wd", "0.1",
           "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0",
           "--local-loss", "--gather-with-grad", "--seed", str(side.seed), "--save-frequency", "1",
           "--log-every-n-steps", "10", "--zeroshot-frequency", "0", "--logs", logs, "--name", "openclip"]
    t0, side.wall_s, rc = timed(cmd, os.path.join(work, "train.log"), child_env(a.threads), work)
    if rc != 0:
        side.error = f"exit {rc}: {tail(os.path.join(work, 'train.log'))}"
        return
    ckpts = os.path.join(logs, "openclip", "checkpoints")
    side.points = [Point(k * a.every, os.path.getmtime(p) - t0, p) for k in range(1, epochs + 1)
                   if os.path.exists(p := os.path.join(ckpts, f"epoch_{k}.pt"))]
    # "Train Epoch: E [n/N (p%)] Data (t): d Batch (t): avg, ..." -- avg over the window since the last line
    rates, last_epoch = [], None
    with open(os.path.join(logs, "openclip", "out.log")) as f:
        for m in re.finditer(r"Train Epoch: (\d+) .*?Batch \(t\): ([\d.]+),", f.read()):
            if m.group(1) == last_epoch:
                rates.append(BATCH / float(m.group(2)))
            last_epoch = m.group(1)
    side.samples_per_s = statistics.median(rates) if rates else None


def ours_overrides(variant: str, known: set[str], flip: float = 0.5, flip_tail: int = 0, low_res: int = 48,
                   low_res_tail: int = 0) -> list[str]:
    """The variant's technique switches; FLIP at ``flip`` with an unmasked tail of ``flip_tail`` steps,
    low resolution at ``low_res`` px with a full-size tail of ``low_res_tail`` steps."""
    on = set(VARIANTS[variant])
    out = [f"{key}={value_on if name in on else value_off}" for name, (key, value_on, value_off) in TECHNIQUES.items()
           if key in known]
    if "patch_dropout" in on:
        out = [f"model.patch_dropout={flip}" if o.startswith("model.patch_dropout=") else o for o in out]
        if flip_tail:
            out.append(f"model.patch_dropout_final_steps={flip_tail}")
    if "low_res" in on:
        out = [f"model.train_image_size={low_res}" if o.startswith("model.train_image_size=") else o for o in out]
        if low_res_tail:
            out.append(f"model.train_image_size_final_steps={low_res_tail}")
    return out


def known_keys() -> set[str]:
    """Technique keys that this build's config accepts."""
    from mtx_dist.config import ConfigError, load_config

    known = set()
    for key, _, off in TECHNIQUES.values():
        try:
            load_config(None, [f"{key}={off}"])
            known.add(key)
        except ConfigError:
            pass
    return known


def run_ours(side: Side, a: argparse.Namespace, train: str, val: str, work: str) -> None:
    run_dir = os.path.join(work, "run")
    for stale in (run_dir, os.path.join(work, "export")):
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [sys.executable, "-m", "mtx_dist.cli", "train", f"model.preset={PRESET}", f"data.train={train}",
           f"data.val={val}", "data.mode=resampled", f"data.batch_size={BATCH}", f"data.workers={WORKERS}",
           f"run.steps={a.steps}", f"run.seed={side.seed}", "run.device=cpu", f"run.dir={run_dir}", "run.log_every=10",
           "run.eval_at_end=false", "run.export_at_end=false", "tracking.enabled=false",
           f"data.shuffle_buffer={a.shuffle_buffer}", f"optim.lr={a.lr}", f"optim.warmup_steps={a.warmup}",
           "optim.schedule=cosine", "optim.weight_decay=0.1",
           "optim.beta1=0.9", "optim.beta2=0.98", "optim.eps=1e-6", "optim.grad_clip=1.0",
           "parallel.precision=fp32", "parallel.zero_stage=0", f"checkpoint.every={a.every}",
           "checkpoint.keep=100000", *side.overrides,
           *([f"model.init_from={os.path.join(side.init, 'open_clip_model.safetensors')}"] if side.init else [])]
    log = os.path.join(work, "train.log")
    t0, side.wall_s, rc = timed(cmd, log, child_env(a.threads), work)
    if rc != 0:
        side.error = f"exit {rc}: {tail(log)}"
        return
    from mtx_dist.export.source import load_checkpoint
    from mtx_dist.export.writers import write_export

    root = os.path.join(run_dir, "checkpoints")
    for tag in sorted(t for t in os.listdir(root) if re.fullmatch(r"step\d+", t)):
        tag_dir = os.path.join(root, tag)
        written = os.path.getmtime(os.path.join(tag_dir, "checkpoint.json")) - t0
        out = os.path.join(work, "export", tag)
        source = load_checkpoint(tag_dir)  # what `mtx-dist export TAG_DIR --format open_clip` runs
        write_export(source.state_dict, source.spec, source.preset, out, source.info, ["open_clip"])
        side.points.append(Point(int(tag[4:]), written, out))
        if not a.keep_checkpoints:
            shutil.rmtree(tag_dir)
    with open(log, errors="replace") as f:
        shown = [int(s) for s in re.findall(r"sps=(\d+)", f.read())]
    windows = [s for i, s in enumerate(shown) if i == 0 or s != shown[i - 1]]  # tqdm repeats a window's rate
    side.samples_per_s = statistics.median(windows[1:]) if len(windows) > 1 else None


# --- judging and the race result -----------------------------------------------------------------

def judge(sides: list[Side], py: str, a: argparse.Namespace, val: str, geometry: str, work: str) -> None:
    models = {f"{s.name}#{s.seed}@{p.step}": p for s in sides for p in s.points}
    if not models:
        return
    out = os.path.join(work, "scores.json")
    cmd = [py, os.path.join(BENCH, "race_openclip_env.py"), "judge", "--threads", str(a.threads), "--val", val,
           "--geometry", geometry, "--out", out, *(f"{label}={p.path}" for label, p in models.items())]
    log = os.path.join(work, "judge.log")
    _, _, rc = timed(cmd, log, child_env(a.threads), work)
    if rc != 0:
        raise SystemExit(f"judge failed (exit {rc}):\n{tail(log)}")
    with open(out) as f:
        for label, score in json.load(f).items():
            p = models[label]
            p.metric, p.i2t_r1, p.t2i_r1 = score["metric"], score["i2t_r1"], score["t2i_r1"]
    if not a.keep_checkpoints:
        for s in sides:
            if s.name == "openclip":
                for p in s.points:
                    os.remove(p.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="demo,hard", help="comma-separated: demo, hard")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"ours on the demo set; of {', '.join(VARIANTS)}")
    p.add_argument("--hard-variants", default="trim+flip", help="ours on the hard set")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--init", choices=("same", "own"), default="same", help="same: both sides start from our init "
                   "of the seed (paired); own: each side from its own random init")
    p.add_argument("--seeds", type=int, default=1, help="runs per side (seeds 0..N-1): the table shows the mean "
                   "curve; one seed's final metric moves by ~0.02 here, on both sides")
    p.add_argument("--flip", type=float, default=0.5, help="the patch-dropout fraction of variants with FLIP")
    p.add_argument("--flip-tail", type=int, default=0, help="FLIP's unmasked tail: last steps without dropout")
    p.add_argument("--low-res", type=int, default=48, help="the training resolution of variants with low_res (px)")
    p.add_argument("--low-res-tail", type=int, default=0, help="low resolution's tail: last steps at full size")
    p.add_argument("--every", type=int, default=40, help="steps between checkpoints (OpenCLIP: steps per epoch)")
    p.add_argument("--shuffle-buffer", type=int, default=OPENCLIP_SHUFFLE,
                   help="ours' data.shuffle_buffer (default: OpenCLIP's sample shuffle buffer, open_clip_train.data's "
                        "_SAMPLE_SHUFFLE_SIZE, so both loaders mix alike)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side (and of the judge)")
    p.add_argument("--quick", action="store_true", help="20 steps, a checkpoint every 10: a smoke run of the harness")
    p.add_argument("--work", default=os.path.expanduser("~/.cache/mtx-dist/race"), help="runs, logs and data")
    p.add_argument("--venv", default=os.path.expanduser("~/.cache/mtx-dist/race-venv"))
    p.add_argument("--keep-checkpoints", action="store_true", help="keep training checkpoints (exports are kept)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the table here")
    a = p.parse_args()
    if a.quick:
        a.steps, a.every, a.warmup = 20, 10, 5
    if a.steps % a.every or a.every % WORKERS:
        raise SystemExit(f"--steps must be a multiple of --every, and --every of {WORKERS} (OpenCLIP gives each "
                         f"loader worker the same number of batches per epoch)")
    datasets = [d for d in a.datasets.split(",") if d]
    asked = {"demo": a.variants.split(","), "hard": a.hard_variants.split(",")}
    for v in (v for vs in asked.values() for v in vs if v):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for d in datasets:
        if d not in DATASETS:
            raise SystemExit(f"unknown data set {d!r}; choose from {', '.join(DATASETS)}")

    from mtx_dist.config import ConfigError, load_config
    from mtx_dist.models import get_preset

    image_size = get_preset(PRESET).vision.image_size
    known = known_keys()
    py = ensure_venv(a.venv)
    os.makedirs(a.work, exist_ok=True)
    geometry = geometry_dir(a.work)
    sides: list[Side] = []  # one per name and data set (seeds merged)
    runs: list[Side] = []  # every run
    for d in datasets:
        train, pools = make_dataset(d, os.path.join(a.work, "data"), image_size, *DATASETS[d])
        say(f"{d}: train {train}, held-out pools {' '.join(pools)}")
        kinds: list[tuple[str, list[str]]] = [("openclip", [])]
        for v in (v for v in asked[d] if v):
            missing = [TECHNIQUES[t][0] for t in VARIANTS[v] if TECHNIQUES[t][0] not in known]
            overrides = ours_overrides(v, known, a.flip, a.flip_tail, a.low_res, a.low_res_tail)
            try:
                load_config(None, overrides)
            except ConfigError as e:
                missing.append(str(e))
            if missing:
                say(f"{d}: ours:{v} skipped: key not in this build ({', '.join(missing)})")
                continue
            kinds.append((f"ours:{v}", overrides))
        # seed-major: every side's seed 0, then every side's seed 1, ... (a drifting machine load hits all sides)
        here = [Side(d, name, overrides, seed=k) for k in range(a.seeds) for name, overrides in kinds]
        for s in here:
            s.init = init_dir(a.work, s.seed) if a.init == "same" else ""
            work = os.path.join(a.work, "runs", d, s.name.replace(":", "-") + (f"-seed{s.seed}" if a.seeds > 1 else ""))
            os.makedirs(work, exist_ok=True)
            say(f"{d}: {s.name} seed {s.seed} {' '.join(s.overrides)}: {a.steps} steps, checkpoint every {a.every} "
                f"(log {work}/train.log)")
            if s.name == "openclip":
                run_openclip(s, py, a, train, geometry, work)
            else:
                run_ours(s, a, train, pools[0], work)  # data.val unused (no eval at end); not the demo default
            say(f"{d}: {s.name}: " + (s.error.splitlines()[0] if s.error else
                f"{s.wall_s:.1f} s, {s.samples_per_s or 0:.1f} samples/s, checkpoints at "
                + ", ".join(f"{pt.time_s:.1f}" for pt in s.points) + " s"))
        say(f"{d}: judging {sum(len(s.points) for s in here)} checkpoints with OpenCLIP's get_clip_metrics")
        judge(here, py, a, "::".join(pools), geometry, os.path.join(a.work, "runs", d))
        for s in here:
            if s.points:
                say(f"{d}: {s.name} seed {s.seed}: metric by step " +
                    ", ".join(f"{pt.step}: {pt.metric:.3f}" for pt in s.points if pt.metric is not None))
        runs += here
        here = merge_seeds(here) if a.seeds > 1 else here
        score_race(here)
        sides += here

    md = table(sides)
    print(md)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md + "\n")
    if a.json:
        info = {"init": a.init, "steps": a.steps, "every": a.every, "batch": BATCH, "lr": a.lr, "warmup": a.warmup,
                "threads": a.threads, "workers": WORKERS, "preset": PRESET, "torch": version("torch"),
                "open_clip_torch": version("open_clip_torch"), "webdataset_openclip": OPENCLIP_WEBDATASET}
        with open(a.json, "w") as f:
            json.dump({"setup": {**info, "seeds": a.seeds}, "sides": [asdict(s) for s in sides],
                       "runs": [asdict(s) for s in runs]}, f, indent=1)


if __name__ == "__main__":
    main()
