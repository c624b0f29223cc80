"""Files written all or nothing, fsync, and file hashes: the one place every writer of the project uses
(shards and their manifests, DALI indices, checkpoints' small files, exports, adapted models, tracking
buffers, hostfiles). Stdlib only.

An atomic write goes to a temporary file beside the target (same folder, hence same filesystem;
``.tmp<pid>`` so concurrent writers never share one), is flushed and fsynced, renamed over the
target, and the folder is fsynced so the rename itself survives a crash. A reader sees the old file
or the new one, never a part; a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator


def fsync_path(path: str) -> None:
    """fsync a file, or a folder (which makes the names in it -- creations, renames -- durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def replace_durably(tmp: str, path: str) -> None:
    """Rename ``tmp`` (already written) over ``path`` after fsyncing it, then fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def atomic_write_with(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the content to the path it is given (for libraries that write by path:
    safetensors, torch.save); then the atomic replace of ``path``."""
    tmp = temp_path(path)
    try:
        write(tmp)
        replace_durably(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """``with atomic_open(path) as f: f.write(...)``: ``path`` is replaced when the block ends without
    an exception, and left as it was otherwise."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        replace_durably(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
