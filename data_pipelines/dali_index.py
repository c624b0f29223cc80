"""Index files for DALI's WebDataset reader (``fn.readers.webdataset(index_paths=...)``).

Without an index DALI scans every tar when a pipeline starts. The index is a text file:
a header line ``v1.2 <number of samples>``, then one line per sample listing each of its files as
``<ext> <data offset> <size> <member name>`` (all on one line, space-separated). A sample is a run of
consecutive regular files whose names share the part before the first dot of the last path
component (the WebDataset key), as DALI and webdataset both split it.

Written here from Python's ``tarfile`` headers rather than by DALI's ``wds2idx`` script, which shells
out to GNU tar and is not importable from the ``nvidia.dali`` package; this also lets the shard
writer index a tar without DALI installed.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from mtx_data_pipelines.files import atomic_write_text

INDEX_VERSION = "v1.2"


class DaliIndexError(ValueError):
    """A tar that cannot be described by a DALI index (empty, compressed, names with spaces)."""


@dataclass(frozen=True)
class Member:
    ext: str
    offset: int  # byte offset of the file's data (after its tar header)
    size: int
    name: str


def split_key(name: str) -> tuple[str, str]:
    """``"dir/abc.seg.jpg"`` -> ``("dir/abc", "seg.jpg")``: the key ends at the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def scan_tar(tar_path: str, exts: Iterable[str] | None = None) -> Iterator[tuple[str, list[Member]]]:
    """Yield ``(key, members)`` for each sample of an uncompressed tar, in file order.

    Directories, links and hidden files (names starting with a dot) are not samples and are passed
    over, as DALI's reader does. ``exts`` keeps only files with those extensions.
    """
    wanted = None if exts is None else set(exts)
    try:
        # "r:" (not "r:*"): DALI reads plain tars only, so a compressed one must fail here.
        with tarfile.open(tar_path, "r:") as tar:
            key, members, end = None, [], 0
            for info in tar:
                end = info.offset_data + -(-info.size // 512) * 512
                if not info.isreg():
                    continue
                base, ext = split_key(info.name)
                if not base or base.endswith("/") or not ext:
                    continue
                if any(c.isspace() for c in info.name):
                    raise DaliIndexError(f"{tar_path}: member name {info.name!r} contains whitespace, "
                                         "which the index format cannot hold")
                if wanted is not None and ext not in wanted:
                    continue
                if base != key:
                    if members:
                        yield key, members
                    key, members = base, []
                members.append(Member(ext, info.offset_data, info.size, info.name))
            _check_end(tar_path, end)
            if members:
                yield key, members
    except tarfile.ReadError as e:
        raise DaliIndexError(f"{tar_path}: not a readable uncompressed tar ({e})") from None


def _check_end(tar_path: str, end: int) -> None:
    """tarfile stops quietly where a header is missing or garbled; a complete archive has a zero
    block there. Anything else means the tar was cut short (a partial copy or download)."""
    with open(tar_path, "rb") as f:
        f.seek(end)
        tail = f.read(512)
    if len(tail) < 512 or any(tail):
        raise DaliIndexError(f"{tar_path}: truncated or corrupt after byte {end} (no end-of-archive block)")


def index_path_for(tar_path: str) -> str:
    """``.../train-000000.tar`` -> ``.../train-000000.idx`` (the name DALI's own tool picks)."""
    root = tar_path.removesuffix(".tar")
    return root + ".idx"


def format_index(samples: list[tuple[str, list[Member]]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for _, members in samples:
        lines.append(" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in members))
    return "\n".join(lines) + "\n"


def write_dali_index(tar_path: str, index_path: str | None = None, exts=None) -> str:
    """Write the DALI index of ``tar_path`` (atomically) and return the index path.

    ``index_path`` defaults to :func:`index_path_for`; ``exts`` (an iterable of extensions such as
    ``("jpg", "txt")``) restricts the index to those files. Raises :class:`DaliIndexError` for a tar
    that holds no samples or cannot be indexed.
    """
    index_path = index_path or index_path_for(tar_path)
    samples = list(scan_tar(tar_path, exts))
    if not samples:
        raise DaliIndexError(f"{tar_path}: no samples to index")
    atomic_write_text(index_path, format_index(samples))
    return index_path
