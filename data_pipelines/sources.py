"""Shard specs and shard reading: brace lists, local paths, ``file://``, ``pipe:`` and fsspec URLs.

A spec is a WebDataset URL pattern (``/data/a-{000000..000099}.tar``); several sources are joined
by ``::``. Local shards are checked for existence up front (a typo fails at startup); remote ones
(``s3://``, ``gs://``, ``http(s)://``, any fsspec protocol) and ``pipe:`` commands are not, and a
read error on them is counted like a broken shard.

Remote URLs are opened through fsspec rather than webdataset's ``curl``/``gsutil`` subprocesses:
one code path for every object store, credentials from the usual fsspec/boto/gcloud configuration,
and no external binaries on the nodes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys

from mtx_data_pipelines.tar_members import tar_members


class ShardSpecError(ValueError):
    """A shard spec or mixing weights that cannot be used."""


def scheme(url: str) -> str:
    """``"local"``, ``"pipe"`` or the URL's protocol (``"s3"``, ``"http"``, ...)."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith("file://"):
        return "local"
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isidentifier() else "local"


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def list_shards(spec: str) -> list[str]:
    """Expand one spec (brace lists, ``::``-joined parts); local shards must exist."""
    urls = expand_urls(spec)
    if not urls:
        raise ShardSpecError(f"shard spec {spec!r} names no shards")
    missing = [u for u in urls if scheme(u) == "local" and not os.path.exists(local_path(u))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards in {spec!r} do not exist "
                                f"(first: {missing[0]})")
    return urls


def parse_weights(text: str) -> list[float]:
    if not text.strip():
        return []
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ShardSpecError(f"mixing weights {text!r} must be comma-separated numbers, e.g. '0.7,0.3'") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ShardSpecError(f"mixing weights {text!r} must be >= 0 with a positive sum")
    return weights


def source_weights(spec: str, weights: str) -> list[float]:
    """The normalized mixing weights of the ``::``-separated sources of ``spec`` (``[]`` without weights);
    checks the text alone (no shard is listed), so a config can be validated before anything starts."""
    w = parse_weights(weights)
    if not w:
        return []
    parts = [p for p in spec.split("::") if p.strip()]
    if len(parts) != len(w):
        raise ShardSpecError(f"{len(w)} mixing weights for {len(parts)} sources in {spec!r}: give one weight per "
                             "'::'-separated source")
    total = sum(w)
    return [x / total for x in w]


def split_sources(spec: str, weights: str = "") -> tuple[list[list[str]], list[float]]:
    """Shard lists per source and their normalized weights. Without weights the whole spec (all
    ``::`` parts) is one source; with weights each ``::`` part is a source with its weight."""
    w = source_weights(spec, weights)
    if not w:
        return [list_shards(spec)], [1.0]
    return [list_shards(p) for p in spec.split("::") if p.strip()], w


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def open_shard(url: str):
    """A readable binary stream of one shard."""
    kind = scheme(url)
    if kind == "local":
        return open(local_path(url), "rb")
    if kind == "pipe":
        # webdataset's pipe (exit status checked, SIGPIPE's 141 accepted), its command started with no
        # signal blocked: loader workers keep SIGTERM blocked (loader.py), which a child would inherit
        from webdataset import utils
        from webdataset.gopen import Pipe

        if utils.enforce_security:  # WDS_SECURE=1, as webdataset's own gopen honours it
            raise ValueError(f"{url}: pipe: shards are refused under WDS_SECURE=1")
        return Pipe(url.removeprefix("pipe:"), mode="rb", shell=True, bufsize=8192, ignore_status=[141],
                    preexec_fn=_unblock_signals)
    import fsspec  # remote object stores and HTTP; only needed for such URLs

    return fsspec.open(url, "rb").open()


def read_shard(url: str, on_error: Callable[[str, Exception], None]) -> Iterator[dict]:
    """Samples (``{"__key__": ..., ext: bytes}``) of one shard. A shard that cannot be opened or
    breaks off (truncated, garbage, network error) yields what came before the failure and is
    reported once to ``on_error``. One shard at a time, so a key at the end of one shard never merges
    with the same key at the start of the next."""
    errors: list[Exception] = []

    def keep_going(exn: Exception) -> bool:
        errors.append(exn)
        return True

    try:
        stream = open_shard(url)
    except Exception as e:  # missing local file, unreachable host, failed command
        on_error(url, e)
        return

    def files() -> Iterator[dict]:
        try:
            yield from tar_members(stream, url)
        except Exception as e:  # truncated, garbage, a read error of the stream: what came before counts
            errors.append(e)

    try:
        yield from group_by_keys(files(), handler=keep_going)
    finally:
        try:
            stream.close()  # a pipe: that exited non-zero raises here
        except Exception as e:
            errors.append(e)
    if errors:
        on_error(url, errors[0])
