"""Our tar member reader yields what webdataset's tarfile-based expander yields, for every header
format a shard writer produces, and names where a broken stream stops."""

from __future__ import annotations

import glob
import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_expander

from mtx_data_pipelines.tar_members import TarFormatError, tar_members


def _webdataset(data: bytes, url: str) -> list[dict]:
    return [m for m in tar_file_expander([{"url": url, "stream": io.BytesIO(data)}]) if m]


def _tar(fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        def add(name, data=b"", kind=tarfile.REGTYPE, **kw):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            for k, v in kw.items():
                setattr(info, k, v)
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("dir", kind=tarfile.DIRTYPE)
        add("dir/0001.jpg", b"\xff\xd8 jpeg bytes" * 40)
        add("dir/0001.txt", "a caption, ünïcode".encode())
        add("dir/0001.json", b"{}")
        add("__meta__", b"{}")  # metadata files: left out, as webdataset leaves them out
        add("__index__/x.txt", b"skipped as metadata")
        add("d" * 120 + "/0002.jpg", b"long path " * 100)  # GNU: a long-name entry; pax: a path record
        add("e" * 60 + "/" + "f" * 90 + "/0003.txt", b"split over prefix and name in ustar")
        add("dir/0002.lnk", kind=tarfile.SYMTYPE, linkname="0001.jpg")
        add("dir/0004.txt", b"")  # an empty member
        add("dir/0005.bin", bytes(range(256)) * 3, mtime=2 ** 40)  # a large number field
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
def test_members_equal_webdatasets_for_every_header_format(fmt):
    # ustar holds neither a 120-character directory name nor a 2**40 mtime: a tar of plain members there
    data = _tar_without_long_names() if fmt == tarfile.USTAR_FORMAT else _tar(fmt)
    got = list(tar_members(io.BytesIO(data), "u"))
    assert got == _webdataset(data, "u") and len(got) >= 3
    assert not any(m["fname"].startswith("__") for m in got)
    assert max(len(m["fname"]) for m in got) > 100  # a long name (GNU entry, pax record or ustar prefix)


def _tar_without_long_names() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("a/0001.jpg", b"x" * 700), ("e" * 60 + "/" + "f" * 90 + "/0003.txt", b"prefix split"),
                           ("__meta__", b"{}"), ("a/0001.txt", b"caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_members_of_the_demo_shards_equal_webdatasets(demo_shards):
    _, _, folder = demo_shards
    for path in sorted(glob.glob(f"{folder}/*.tar"))[:3]:
        data = open(path, "rb").read()
        assert list(tar_members(io.BytesIO(data), path)) == _webdataset(data, path)


def test_a_broken_stream_yields_what_came_before_and_names_where_it_stops():
    data = _tar(tarfile.GNU_FORMAT)
    whole = list(tar_members(io.BytesIO(data), "u"))
    cut = data.index(b"long path ") + 10  # inside the long-named member's data
    got = []
    with pytest.raises(TarFormatError, match="ends inside a member"):
        for m in tar_members(io.BytesIO(data[:cut]), "u"):
            got.append(m)
    assert got == whole[:3] and [m["fname"] for m in got] == ["dir/0001.jpg", "dir/0001.txt", "dir/0001.json"]
    with pytest.raises(TarFormatError, match="checksum at byte 0"):
        list(tar_members(io.BytesIO(b"this is not a tar archive" * 40), "u"))
    flipped = bytearray(data)
    flipped[512 + 10] ^= 1  # a bit of the second header's name
    with pytest.raises(TarFormatError, match="checksum at byte 512"):
        list(tar_members(io.BytesIO(bytes(flipped)), "u"))


class _Trickle(io.RawIOBase):
    """A network-like stream: each read returns at most 7 bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        n = min(7 if n < 0 else n, 7)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_compressed_and_trickling_streams_read_as_webdataset_reads_them(compression):
    plain = _tar(tarfile.GNU_FORMAT)
    data = plain
    if compression:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode=f"w:{compression}") as tf:
            with tarfile.open(fileobj=io.BytesIO(plain)) as src:
                for m in src.getmembers():
                    tf.addfile(m, src.extractfile(m) if m.isreg() else None)
        data = out.getvalue()
    assert list(tar_members(_Trickle(data), "u")) == _webdataset(data, "u") == _webdataset(plain, "u")


def test_empty_streams_malformed_headers_and_big_numbers():
    with pytest.raises(TarFormatError, match="empty"):
        list(tar_members(io.BytesIO(b""), "u"))
    from mtx_data_pipelines.tar_members import _number, _pax_records
    with pytest.raises(TarFormatError, match="malformed pax"):
        _pax_records(b"0 path=x\n")  # a zero length never advances: refused, not looped on
    assert _pax_records(b"12 path=abc\n") == {"path": "abc"}
    assert _number(b"\x80" + (2 ** 40).to_bytes(11, "big")) == 2 ** 40  # GNU base-256 (members >= 8 GiB)
    assert _number(b"0000644\0") == 0o644
