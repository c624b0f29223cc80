"""DirectFile: checkpoint files written past the page cache (mtx_data_pipelines.files)."""

from __future__ import annotations

import ctypes
import mmap
import os
import pathlib
import random
import shutil
import tempfile
import threading

import pytest
import torch

from mtx_data_pipelines import files
from mtx_data_pipelines.files import DirectFile

STAGE = files._STAGE_BYTES


def _write(path, data: bytes, direct: bool, seed: int = 0) -> DirectFile:
    """``data`` in writes of random sizes (some larger than the staging buffer)."""
    rng, done = random.Random(seed), 0
    with DirectFile(str(path), direct=direct) as f:
        while done < len(data):
            k = rng.choice((1, 7, 4096, 10_000, STAGE + 3))
            assert f.write(memoryview(data)[done:done + k]) == len(data[done:done + k])
            done += k
        assert f.tell() == len(data)
    return f


@pytest.mark.parametrize("direct", [True, False])
def test_bytes_land_exactly(tmp_path, direct):
    rng = random.Random(1)
    for n in (0, 1, 4095, 4096, 4097, STAGE - 1, STAGE, STAGE + 1, 2 * STAGE + 12_345):
        data = rng.randbytes(n)
        _write(tmp_path / f"{n}.bin", data, direct, seed=n)
        assert (tmp_path / f"{n}.bin").read_bytes() == data, n


def test_a_file_in_memory_filesystem_is_written_whole():
    """/dev/shm: tmpfs, which refuses O_DIRECT on older kernels (then the file is written normally)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    data = random.Random(2).randbytes(STAGE + 5000)
    path = f"/dev/shm/mtx-test-{os.getpid()}.bin"
    try:
        _write(path, data, direct=True)
        with open(path, "rb") as fh:
            assert fh.read() == data
    finally:
        os.remove(path)


def _cached_pages(path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages of the file), by mincore(2) over a mapping of it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = os.path.getsize(path), mmap.PAGESIZE
    pages = -(-size // page)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec), pages


def _filesystem(path) -> str:
    """The type of the filesystem ``path`` is on (the longest mount point above it in /proc/mounts)."""
    path, best, kind = os.path.realpath(path), "", ""
    with open("/proc/mounts") as f:
        for line in f:
            mount, fstype = line.split()[1:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


@pytest.fixture
def disk_dir(tmp_path):
    """A folder on ext4 or xfs, where O_DIRECT writes bypass the page cache (tmpfs keeps every page in
    memory, and ZFS, btrfs with compression or ext4 with data=journal buffer anyway): pytest's folder,
    or one beside the tests when that is in memory."""
    if _filesystem(tmp_path) in ("ext4", "xfs"):
        yield tmp_path
        return
    here = tempfile.mkdtemp(prefix=".direct-io-test-", dir=os.path.dirname(os.path.abspath(__file__)))
    try:
        if _filesystem(here) not in ("ext4", "xfs"):
            pytest.skip(f"no ext4 or xfs folder to write to ({_filesystem(tmp_path)}, {_filesystem(here)})")
        yield here
    finally:
        shutil.rmtree(here, ignore_errors=True)


def test_direct_writes_leave_the_page_cache_alone(disk_dir):
    tmp_path = pathlib.Path(disk_dir)
    data = random.Random(3).randbytes(3 * STAGE + 100)
    buffered = _write(tmp_path / "buffered.bin", data, direct=False)
    direct = _write(tmp_path / "direct.bin", data, direct=True)
    assert not buffered.direct
    cached, pages = _cached_pages(tmp_path / "buffered.bin")
    assert cached > pages // 2  # the measurement sees a freshly written file's pages
    assert direct.direct, "ext4 and xfs take O_DIRECT"
    cached, pages = _cached_pages(tmp_path / "direct.bin")
    assert cached <= 1, f"{cached} of {pages} pages in the page cache"  # the last partial block, buffered
    assert (tmp_path / "direct.bin").read_bytes() == data


def test_torch_save_through_a_direct_file_loads_equal(tmp_path):
    state = {"w": torch.randn(3, STAGE // 8), "step": 7, "names": ["a", "b"]}
    with DirectFile(str(tmp_path / "s.pt")) as f:
        torch.save(state, f)
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 7 and back["names"] == ["a", "b"]


def test_the_staging_buffer_is_reused_and_never_shared(tmp_path):
    with DirectFile(str(tmp_path / "a")) as a:
        with DirectFile(str(tmp_path / "b")) as b:  # nested: b gets a buffer of its own
            assert a._buffer is not b._buffer
            a.write(b"A" * 5000)
            b.write(b"B" * 5000)
    reused = a._buffer if files._stages.free is a._buffer else b._buffer
    with DirectFile(str(tmp_path / "c")) as c:
        assert c._buffer is reused
    assert (tmp_path / "a").read_bytes() == b"A" * 5000 and (tmp_path / "b").read_bytes() == b"B" * 5000


def test_each_thread_stages_in_its_own_buffer(tmp_path):
    data = {k: random.Random(k).randbytes(2 * STAGE + 777) for k in range(4)}
    buffers: dict[int, object] = {}

    def write(k):
        for n in range(2):
            f = _write(tmp_path / f"{k}-{n}.bin", data[k], direct=True, seed=k)
            buffers.setdefault(k, f._buffer)
            assert f._buffer is buffers[k]  # this thread's buffer, reused from file to file

    threads = [threading.Thread(target=write, args=(k,)) for k in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(b) for b in buffers.values()}) == len(data)
    for k in data:
        for n in range(2):
            assert (tmp_path / f"{k}-{n}.bin").read_bytes() == data[k]


def test_an_error_inside_the_block_writes_nothing_more(tmp_path):
    with pytest.raises(RuntimeError, match="serializer failed"):
        with DirectFile(str(tmp_path / "x")) as f:
            f.write(b"x" * (STAGE + 10))  # one stage written, 10 bytes staged
            raise RuntimeError("serializer failed")
    assert (tmp_path / "x").stat().st_size == STAGE  # the staged tail was dropped, the fd closed
    with DirectFile(str(tmp_path / "y")) as g:  # the thread's buffer came back
        assert g._buffer is f._buffer
