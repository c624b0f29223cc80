"""What a shard spec is, as MLflow records a dataset: name, source, digest and profile.

The digest comes from the manifests our writers leave beside the shards (``mtx-dist shards``:
``manifest.json``; the demo generator: ``<split>.manifest.json``), which hold each shard's sha256,
samples and bytes: the same shards give the same digest wherever they are mounted, and a re-written
shard changes it. Shards that no manifest describes (someone else's tars, remote buckets) are
recorded by their spec and shard count, and the digest is that of the expanded URL list.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field

from mtx_data_pipelines.sources import list_shards, local_path, scheme

DIGEST_CHARS = 16  # MLflow stores at most 36 characters of a dataset digest


@dataclass
class ShardSet:
    name: str
    source: str  # the spec as given
    source_type: str  # "local", "pipe", or the URL scheme ("s3", "gs", "http", ...)
    digest: str
    profile: dict = field(default_factory=dict)  # shards, and with manifests samples and bytes


def _manifest_entries(folder: str) -> dict[str, dict]:
    """shard file name -> its manifest entry, over every manifest in ``folder``."""
    entries: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*manifest.json"))):
        try:
            with open(path) as f:
                manifest = json.load(f)
            for s in manifest.get("shards", []):
                if isinstance(s, dict) and s.get("name") and s.get("sha256"):
                    entries.setdefault(s["name"], s)
        except (OSError, ValueError, AttributeError):
            continue  # not one of ours, or unreadable: the shards are described without it
    return entries


def _name(urls: list[str]) -> str:
    """``<folder>/<file prefix>`` of the first shard: ``/data/hard/train-000003.tar`` -> ``hard/train``."""
    path = local_path(urls[0]).rstrip("/")
    stem = os.path.basename(path).split(".")[0].rstrip("0123456789").rstrip("-_") or "shards"
    folder = os.path.basename(os.path.dirname(path))
    return f"{folder}/{stem}" if folder else stem


def describe(spec: str) -> ShardSet:
    """The shard set named by ``spec`` (brace lists, ``::``-joined parts; local shards must exist)."""
    urls = list_shards(spec)
    kinds = {scheme(u) for u in urls}
    described = []
    cache: dict[str, dict[str, dict]] = {}
    for u in urls:
        if scheme(u) != "local":
            break
        folder, base = os.path.split(os.path.abspath(local_path(u)))
        entry = cache.setdefault(folder, _manifest_entries(folder)).get(base)
        if entry is None or not isinstance(entry.get("samples"), int):
            break
        described.append(entry)
    h = hashlib.sha256()
    profile: dict = {"shards": len(urls)}
    if len(described) == len(urls):
        for e in described:
            h.update(f"{e['sha256']}\n".encode())
        profile.update(samples=sum(e["samples"] for e in described),
                       bytes=sum(int(e.get("bytes", 0)) for e in described), digest_from="manifest sha256")
    else:
        for u in urls:
            h.update(f"{u}\n".encode())
        profile["digest_from"] = "shard URLs (no manifest)"
    return ShardSet(name=_name(urls), source=spec, source_type=kinds.pop() if len(kinds) == 1 else "mixed",
                    digest=h.hexdigest()[:DIGEST_CHARS], profile=profile)
