"""The DALI backend in CPU mode (device_id=None): same eval transform as the cpu backend within a
stated tolerance, exact resume through DALI checkpointing, and what it does with dirty data."""

import io
import os
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mtx_data_pipelines.loader import Loader, LoaderStateError, StreamConfig
from tests.data.test_streams import _jpeg, write_shards
from tests.data.test_training_data import _tar_bytes

from mtx_data_pipelines.dali_loader import DaliDataError, DaliLoader


def _photo(i: int, w: int, h: int) -> bytes:
    """Smooth structure plus sensor-like noise, JPEG quality 90: closer to photos than flat colour."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(x / 7 + i), 128 + 100 * np.cos(y / 11), (x * 255 // w + y * 255 // h) // 2], -1)
    img = img + np.random.default_rng(i).normal(0, 10, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _dali(cfg, tmp_path, **kw):
    return DaliLoader(cfg, index_dir=str(tmp_path / "index"), **kw)


@pytest.mark.parametrize("size", [48, 224])
def test_dali_eval_transform_matches_the_cpu_backend(tmp_path, size):
    # down- and up-scaling, odd and even crop margins, portrait and landscape
    sizes = [(96, 72), (72, 96), (150, 100), (64, 64), (257, 190), (300, 300), (49, 80), (500, 375)]
    with wds.TarWriter(str(tmp_path / "p-000000.tar")) as sink:
        for i, (w, h) in enumerate(sizes):
            sink.write({"__key__": f"k{i}", "jpg": _photo(i, w, h), "txt": b"a photo"})
    cfg = StreamConfig(str(tmp_path / "p-000000.tar"), 8, size, 16, train=False, workers=0)
    cpu = next(iter(Loader(cfg)))
    dali = next(iter(_dali(cfg, tmp_path)))
    assert dali["key"] == cpu["key"] and torch.equal(dali["text"], cpu["text"])
    assert dali["image"].shape == cpu["image"].shape == (8, 3, size, size) and dali["image"].dtype == torch.float32
    diff = (dali["image"] - cpu["image"]).abs()
    # Units: normalized pixels (one 8-bit level = 1 / (255 * std) ~ 0.015). PIL rounds the resized
    # image to 8 bits (+-0.5 level, mean 0.25 level ~ 0.004) and its bicubic kernel weights differ
    # slightly from DALI's: measured mean 0.0021-0.0029, max 0.03-0.058 (4 levels, at sharp edges).
    # Geometry is identical (same output size, same half-to-even crop anchor): a one-pixel shift
    # would give a mean of ~0.1 on these images.
    assert diff.mean() < 0.01, float(diff.mean())
    assert diff.max() < 0.1, float(diff.max())
    for i in range(8):
        assert diff[i].mean() < 0.01, (i, float(diff[i].mean()))


def test_dali_resume_is_exact_through_checkpointing(tmp_path):
    spec, keys = write_shards(tmp_path, "r", [7, 9, 6])
    cfg = StreamConfig(spec, 4, 16, 16, train=True, workers=1, shuffle_buffer=8)
    it = iter(_dali(cfg, tmp_path))
    reference = [next(it) for _ in range(14)]  # 56 samples: past the first epoch (22)
    assert {k for b in reference for k in b["key"]} == set(keys)
    assert sorted(k for b in reference for k, e in zip(b["key"], b["epoch"]) if e == 0) == sorted(keys)
    for k in (3, 8):
        first = _dali(cfg, tmp_path)
        it = iter(first)
        for _ in range(k):
            next(it)
        resumed = _dali(cfg, tmp_path)
        resumed.load_state_dict(first.state_dict())
        it = iter(resumed)
        for ref in reference[k:]:
            got = next(it)
            assert got["key"] == ref["key"] and torch.equal(got["image"], ref["image"])
    with pytest.raises(LoaderStateError, match="cpu backend"):
        _dali(cfg, tmp_path).load_state_dict(Loader(cfg).state_dict())


def test_dali_skips_what_it_can_and_names_what_it_cannot(tmp_path):
    d = tmp_path / "dirty"
    os.makedirs(d)
    members = []
    for i in range(6):
        members += [(f"g{i}.jpg", _jpeg(i)), (f"g{i}.txt", f"good {i}".encode())]
    members += [("nocap.jpg", _jpeg(50)), ("xyz.xyz", b"?"), ("noimg.txt", b"orphan"),
                ("empty.jpg", _jpeg(51)), ("empty.txt", b" "), ("latin.jpg", _jpeg(52)), ("latin.txt", b"caf\xe9")]
    (d / "x-000000.tar").write_bytes(_tar_bytes(members))
    full = _tar_bytes(members[:4])
    (d / "x-000001.tar").write_bytes(full[: len(full) // 2])  # truncated
    (d / "x-000002.tar").write_bytes(b"\x17" * 3000)  # not a tar
    cfg = StreamConfig(f"{d}/x-{{000000..000002}}.tar", 2, 16, 16, train=False, workers=0)
    loader = _dali(cfg, tmp_path)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == [f"g{i}" for i in range(6)]
    assert loader.skipped == Counter(tar_error=2, missing_caption=1, missing_image=1, unknown_extension=1,
                                     empty_caption=1, bad_caption_encoding=1)

    (d / "bad-000000.tar").write_bytes(_tar_bytes(members[:4] + [("bad.jpg", b"\xff\xd8 not a jpeg"), ("bad.txt", b"x")]))
    with pytest.raises(DaliDataError, match="data.backend=cpu"):
        list(_dali(StreamConfig(f"{d}/bad-000000.tar", 2, 16, 16, train=False, workers=0), tmp_path))


def test_dali_refuses_what_it_does_not_support(tmp_path):
    spec, _ = write_shards(tmp_path, "n", [3])
    for kw, match in ((dict(weights="1"), "cpu backend"), (dict(mode="resampled"), "cpu backend"),
                      (dict(shards="http://127.0.0.1:9/a.tar"), "local shards only")):
        with pytest.raises(ValueError, match=match):
            _dali(StreamConfig(**{**dict(shards=spec, batch_size=2, image_size=16, context_length=16), **kw}), tmp_path)
