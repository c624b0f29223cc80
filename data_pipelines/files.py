"""Files written all or nothing, fsync, and file hashes: the one place every writer of the project uses
(shards and their manifests, DALI indices, checkpoints' small files, exports, adapted models, tracking
buffers, hostfiles), and large files written past the page cache (checkpoints). Stdlib only.

An atomic write goes to a temporary file beside the target (same folder, hence same filesystem;
``.tmp<pid>`` so concurrent writers never share one), is flushed and fsynced, renamed over the
target, and the folder is fsynced so the rename itself survives a crash. A reader sees the old file
or the new one, never a part; a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import threading
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


# -- writes past the page cache ---------------------------------------------------------------------
# Why our own: DeepSpeed's FastFileWriter does this through its async-I/O op, which must be compiled
# against libaio (absent on our machines and on the GPU machine); plain O_DIRECT writes from one reused
# staging buffer are all a checkpoint needs.

_BLOCK = 4096  # O_DIRECT aligns lengths and file offsets to the logical block (512 or 4096 bytes)
_STAGE_BYTES = 8 << 20  # bytes per direct write
_stages = threading.local()  # each writing thread reuses its own staging buffer from file to file


def _take_buffer() -> mmap.mmap:
    """This thread's staging buffer (page-aligned, touched once, kept), or a new one while it is in use."""
    buffer = getattr(_stages, "free", None)
    if buffer is None:
        buffer = mmap.mmap(-1, _STAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _stages.free = None
    return buffer


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; False where the platform or filesystem refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on


class DirectFile:
    """A new binary file written with O_DIRECT: bytes go from a reused page-aligned staging buffer to the
    device without passing through the page cache (``torch.save(obj, DirectFile(path))``).

    For files written once and not read back soon (checkpoints): no copy into page-cache pages, and the
    cached data set is not evicted by them. The last partial block is written buffered. ``direct``: the
    whole blocks went out with O_DIRECT; False where the filesystem refuses it (some network and
    in-memory filesystems), and the file is then written normally. Like any write, the data is durable
    only after an fsync (``fsync_path``). Leaving the ``with`` block on an exception closes the file
    without writing what is still staged.
    """

    def __init__(self, path: str, direct: bool = True) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self.direct = direct and _set_direct(self._fd, True)
            self._buffer = _take_buffer()
        except BaseException:
            os.close(self._fd)
            raise
        self._stage = memoryview(self._buffer)
        self._fill = 0
        self._size = 0

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        done, n = 0, len(src)
        while done < n:
            k = min(n - done, len(self._stage) - self._fill)
            self._stage[self._fill:self._fill + k] = src[done:done + k]
            self._fill, done = self._fill + k, done + k
            if self._fill == len(self._stage):
                self._drain(0, self._fill)
                self._fill = 0
        self._size += n
        return n

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        """Nothing to do before close: whole staging buffers are written as they fill."""

    def _drain(self, start: int, end: int) -> None:
        done = start
        while done < end:
            try:
                done += os.write(self._fd, self._stage[done:end])
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self.direct = _set_direct(self._fd, False)  # accepted at open, refused at write

    def close(self, abort: bool = False) -> None:
        """Write what is staged and close; ``abort``: only close (the file stays incomplete)."""
        if self._fd < 0:
            return
        try:
            aligned = self._fill - self._fill % _BLOCK
            if not abort:
                self._drain(0, aligned)
                if self._fill > aligned:  # the last partial block: buffered
                    if self.direct:
                        _set_direct(self._fd, False)
                    self._drain(aligned, self._fill)
        finally:
            os.close(self._fd)
            self._fd = -1
            self._stage.release()
            _stages.free = self._buffer

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abort=exc_type is not None)
