"""The members of a tar stream, read without Python's ``tarfile``.

Why our own: webdataset reads shards through ``tarfile``, which builds a ``TarInfo`` for every member
and decodes each of its header fields in Python (~40 us per member). An image-text sample is three
small members (a JPEG of a few KB, a caption, a JSON), so that was ~130 us of a loader worker's
~300 us per sample on small images, as much CPU as decoding the JPEG (docs/BENCHMARKS.md). This
reads what shard writers produce (tarfile, GNU tar, webdataset's ``TarWriter``: ustar, GNU and pax
headers), checks each header's checksum, and yields what webdataset's ``tar_file_expander`` yields
(regular files, with the same ``__..__`` metadata files left out), so webdataset's ``group_by_keys``
groups them as before. Every other entry type (directories, links, devices) is skipped like there;
gzip, bzip2 and xz compressed shards are read through Python's decompressors, as tarfile's "r|*" did;
an empty stream, a GNU sparse member or a malformed header is a :class:`TarFormatError`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_END = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # a file; "7" (contiguous file) is one too, as tarfile reads it
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta default


class TarFormatError(ValueError):
    """A shard that is not a readable tar archive from some point on (garbage, truncated)."""


def _number(field: bytes) -> int:
    """A header's numeric field: NUL/space-terminated octal, or GNU's base-256 (first byte 0x80)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"not a number in a tar header: {field!r}") from None


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum field against the sum of its bytes (that field counted as spaces),
    unsigned or, as some old writers computed it, signed."""
    try:
        stored = _number(header[148:156])
    except TarFormatError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    return stored == unsigned or stored == sum(struct.unpack("148b8x356b", header)) + 8 * 32


def _read_up_to(stream: BinaryIO, n: int) -> bytes:
    """``n`` bytes, fewer only at the end of the stream (a network stream's read may return less)."""
    data = stream.read(n)
    if len(data) in (0, n):
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read(stream: BinaryIO, n: int, what: str, offset: int) -> bytes:
    data = _read_up_to(stream, n)
    if len(data) != n:
        raise TarFormatError(f"tar stream ends inside {what} at byte {offset} ({len(data)} of {n} bytes)")
    return data


class _Prefixed:
    """A stream with bytes already read put back in front of it."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out


def _decompressed(stream: BinaryIO) -> BinaryIO:
    """``stream`` itself, or a decompressing reader of it for a gzip, bzip2 or xz compressed tar (which
    webdataset's tarfile mode "r|*" read too)."""
    head = _read_up_to(stream, 6)
    whole = _Prefixed(head, stream)
    if head.startswith(b"\x1f\x8b"):
        import gzip
        return gzip.GzipFile(fileobj=whole, mode="rb")
    if head.startswith(b"BZh"):
        import bz2
        return bz2.BZ2File(whole, mode="rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        import lzma
        return lzma.LZMAFile(whole, mode="rb")
    return whole


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if length <= space - pos + 1 or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise TarFormatError(f"malformed pax header record at {pos}: {data[pos:pos + 40]!r}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def tar_members(stream: BinaryIO, url: str) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` for each regular file of the tar ``stream``, in order. Raises
    :class:`TarFormatError` where the stream stops being a tar archive (after the members before it)."""
    offset, long_name, pax = 0, None, {}
    stream = _decompressed(stream)
    while True:
        header = _read_up_to(stream, BLOCK)
        if not header and offset == 0:
            raise TarFormatError("empty tar stream (0 bytes)")
        if not header or header == _END:  # the end-of-archive block (or a missing one, as tarfile allows)
            return
        if len(header) != BLOCK:
            raise TarFormatError(f"tar stream ends inside a header at byte {offset}")
        if not _checksum_ok(header):
            raise TarFormatError(f"bad tar header checksum at byte {offset}")
        kind = header[156:157]
        if kind == b"S":  # tarfile reads it as a file with holes; no shard writer makes one
            raise TarFormatError(f"GNU sparse member at byte {offset}: not supported in shards")
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        data = _read(stream, size, "a member", offset)
        _read(stream, -size % BLOCK, "a member's padding", offset)
        offset += BLOCK + size + -size % BLOCK
        if kind == b"L":  # GNU long name: the name of the next member
            long_name = _text(data)
            continue
        if kind in (b"x", b"g"):  # pax: records for the next member (x) or global ones, unused here (g)
            if kind == b"x":
                pax = _pax_records(data)
            continue
        name = pax.get("path") or long_name
        if name is None:
            name, prefix = _text(header[:100]), _text(header[345:500])
            if header[257:263] == b"ustar\0" and prefix:  # POSIX ustar splits long paths over two fields
                name = f"{prefix}/{name}"
        long_name, pax = None, {}
        if kind not in _REGULAR or name.endswith("/"):  # an old-style directory is a file named "dir/"
            continue
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
            continue
        yield {"fname": name, "data": data, "__url__": url}
