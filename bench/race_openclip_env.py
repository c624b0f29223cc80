"""The OpenCLIP side of ``bench/bench_race.py``; runs with the race venv's Python, never with ours.

    python race_openclip_env.py versions
    python race_openclip_env.py train --threads 2 -- <open_clip_train.main arguments>
    python race_openclip_env.py judge --threads 2 --val POOL::POOL... --geometry DIR --out scores.json LABEL=MODEL ...

``train`` runs OpenCLIP's own trainer (``open_clip_train.main``) unchanged, through runpy, after
defining the torchvision op schemas that a CPU torch lacks (``mtx_dist.interop.torchvision_shim``).
Loader workers are forked, so they inherit the shim.

``judge`` scores models with OpenCLIP's own code: ``open_clip.create_model_and_transforms`` (its eval
preprocessing and tokenizer) and ``open_clip_train.train.get_clip_metrics`` within each held-out pool
(a shard spec; pools are joined by ``::``), recall@1 averaged over the pools.
A MODEL is an OpenCLIP folder (``open_clip_config.json`` + weights: our export) or a ``.pt`` training
checkpoint of OpenCLIP, loaded into the geometry of ``--geometry`` (a folder holding only the config).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import runpy
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(threads: int) -> None:
    sys.path.insert(0, REPO)  # mtx_dist.interop.torchvision_shim (torch only) for the shim
    import torch

    from mtx_dist.interop.torchvision_shim import torchvision_shim

    torch.set_num_threads(threads)
    torchvision_shim()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "webdataset", "open_clip_torch", "torchvision")}


def train(threads: int, argv: list[str]) -> None:
    _setup(threads)
    sys.argv = ["open_clip_train.main", *argv]
    runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)


def read_pairs(spec: str) -> list[tuple[str, bytes, str]]:
    """(key, jpeg bytes, caption) of every sample of the shards, in shard order."""
    import braceexpand

    pairs = []
    for path in braceexpand.braceexpand(spec):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        pairs += [(k, f["jpg"], f["txt"].decode()) for k, f in members.items() if "jpg" in f and "txt" in f]
    return pairs


def judge(threads: int, val: str, geometry: str, models: list[str], out: str) -> None:
    _setup(threads)
    import open_clip
    import torch
    import torch.nn.functional as F
    from open_clip_train.train import get_clip_metrics
    from PIL import Image

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{geometry}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{geometry}")
    pools = []
    for spec in val.split("::"):
        pairs = read_pairs(spec)
        pools.append((torch.stack([preprocess(Image.open(io.BytesIO(jpg)).convert("RGB")) for _, jpg, _ in pairs]),
                      tokenizer([caption for _, _, caption in pairs])))
    n = sum(len(texts) for _, texts in pools)
    scores = {}
    for item in models:
        label, _, path = item.partition("=")
        if path.endswith(".pt"):  # OpenCLIP's own training checkpoint: its geometry, then its weights
            model = open_clip.create_model(f"local-dir:{geometry}")
            open_clip.load_checkpoint(model, path)
        else:
            model = open_clip.create_model(f"local-dir:{path}")
        model.eval()
        i2t = t2i = 0.0
        for images, texts in pools:  # retrieval within each pool, averaged over pools
            with torch.no_grad():
                img = torch.cat([model.encode_image(b) for b in images.split(256)])
                txt = torch.cat([model.encode_text(b) for b in texts.split(256)])
                m = get_clip_metrics(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model.logit_scale.exp())
            i2t += float(m["image_to_text_R@1"]) / len(pools)
            t2i += float(m["text_to_image_R@1"]) / len(pools)
        scores[label] = {"i2t_r1": i2t, "t2i_r1": t2i, "metric": (i2t + t2i) / 2, "n": n, "pools": len(pools)}
        print(f"judge: {label}: i2t R@1 {i2t:.3f}, t2i R@1 {t2i:.3f} ({len(pools)} pools, {n} pairs)", flush=True)
    with open(out, "w") as f:
        json.dump(scores, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("versions")
    t = sub.add_parser("train")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    j = sub.add_parser("judge")
    j.add_argument("--threads", type=int, default=2)
    j.add_argument("--val", required=True)
    j.add_argument("--geometry", required=True)
    j.add_argument("--out", required=True)
    j.add_argument("models", nargs="+")
    args = p.parse_args()
    if args.cmd == "versions":
        print(json.dumps(versions()))
    elif args.cmd == "train":
        train(args.threads, args.rest[1:] if args.rest[:1] == ["--"] else args.rest)
    else:
        judge(args.threads, args.val, args.geometry, args.models, args.out)


if __name__ == "__main__":
    main()
