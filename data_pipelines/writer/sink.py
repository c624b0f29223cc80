"""Rolling tar output: shards cut by sample count or byte size, each written under a temporary name
and renamed when complete, then hashed and indexed for DALI."""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable

from mtx_data_pipelines.dali_index import write_dali_index
from mtx_data_pipelines.files import replace_durably, sha256_file

BLOCK = 512  # tar header and data granularity (USTAR, as webdataset's TarWriter writes)
RECORD = 20 * BLOCK  # tarfile pads a closed archive to a whole record
END = 2 * BLOCK  # two zero blocks end an archive


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def sample_footprint(files: dict[str, bytes], key: str) -> int:
    """Bytes the sample adds to a tar: a header block per file plus its data padded to blocks."""
    for ext in files:
        if len(f"{key}.{ext}") > 100:  # USTAR's name field; longer names would need extra headers
            raise ValueError(f"member name {key}.{ext} longer than 100 characters")
    return sum(BLOCK + _round_up(len(v), BLOCK) for v in files.values())


class ShardSink:
    """Writes samples into ``<prefix>-NNNNNN.tar`` under ``out_dir``; a shard is closed before a
    sample would take it past ``samples_per_shard`` samples or ``max_shard_bytes`` bytes (its final
    size, end blocks and padding included). A single sample bigger than the byte limit gets a shard
    of its own. ``close()`` returns one record per shard."""

    def __init__(self, out_dir: str, prefix: str, samples_per_shard: int, max_shard_bytes: int) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.records: list[dict] = []
        self._writer = None
        self._file = None
        self._count = self._pos = 0

    def final_path(self, i: int) -> str:
        return os.path.join(self.out_dir, f"{self.prefix}-{i:06d}.tar")

    def _tmp_path(self) -> str:
        return os.path.join(self.out_dir, f".{self.prefix}-{len(self.records):06d}.tar.tmp{os.getpid()}")

    def write(self, key: str, files: dict[str, bytes]) -> None:
        size = sample_footprint(files, key)
        if self._writer is not None and (
                self._count >= self.samples_per_shard
                or _round_up(self._pos + size + END, RECORD) > self.max_shard_bytes):
            self._finish()
        if self._writer is None:
            self._file = open(self._tmp_path(), "wb")  # noqa: SIM115 -- open across many write() calls
            # Plain tarfile rather than webdataset's TarWriter, whose import pulls in torch: the
            # writer stays light in every pool worker. USTAR headers, as TarWriter writes them.
            self._writer = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        for ext in sorted(files):
            info = tarfile.TarInfo(f"{key}.{ext}")
            # fixed owner, mode and time: equal input gives equal bytes
            info.size, info.mtime, info.mode, info.uname, info.gname = len(files[ext]), 0, 0o444, "mtx", "mtx"
            self._writer.addfile(info, io.BytesIO(files[ext]))
        self._count += 1
        self._pos += size

    def _finish(self) -> None:
        self._writer.close()
        tmp = self._file.name
        self._file.close()
        final = self.final_path(len(self.records))
        replace_durably(tmp, final)  # only complete shards ever carry a final name
        index = write_dali_index(final)
        self.records.append({"name": os.path.basename(final), "samples": self._count,
                             "bytes": os.path.getsize(final), "sha256": sha256_file(final),
                             "index": os.path.basename(index)})
        self._writer = self._file = None
        self._count = self._pos = 0

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish()
        return self.records

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file), keeping the completed ones."""
        if self._writer is not None:
            tmp = self._file.name
            try:
                self._writer.close()
            finally:
                self._file.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
            self._writer = self._file = None


_NUMBERED = re.compile(r"^(.*?)(\d+)(\.tar)$")


def brace_spec(paths: Iterable[str]) -> str:
    """A WebDataset spec naming ``paths`` (in their order): runs of consecutively numbered,
    equally padded names become ``prefix{000..012}.tar``; separate runs are joined with ``::``."""
    parts: list[str] = []
    run: list[tuple[str, int, int, str]] = []  # (prefix, number, width, suffix)

    def flush() -> None:
        if not run:
            return
        p, lo, w, s = run[0]
        hi = run[-1][1]
        parts.append(f"{p}{lo:0{w}d}{s}" if len(run) == 1 else f"{p}{{{lo:0{w}d}..{hi:0{w}d}}}{s}")
        run.clear()

    for path in paths:
        m = _NUMBERED.match(path)
        if not m or "{" in path or "}" in path or "::" in path:
            flush()
            parts.append(path)
            continue
        item = (m.group(1), int(m.group(2)), len(m.group(2)), m.group(3))
        if run and (item[0], item[2], item[3]) == (run[-1][0], run[-1][2], run[-1][3]) and item[1] == run[-1][1] + 1:
            run.append(item)
        else:
            flush()
            run.append(item)
    flush()
    return "::".join(parts)
