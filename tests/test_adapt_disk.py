"""`mtx-dist adapt train` on folders larger than its memory budget: batches decoded from the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mtx_dist.adapt import AdaptConfig, predict, train_adapter
from mtx_dist.adapt.data import Moments
from tests.test_adapt import NO_TRACKING, _one_thread, audio_dir, cube_dir, encoder, gray_dir, image_dir  # noqa: F401


def test_moments_merge_chunks_like_the_whole():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (1000, 4)) * np.array([1, 10, 100, 1e-3])
    m = Moments()
    for chunk in np.array_split(x, [1, 7, 300, 301, 650]):
        m.add(chunk)
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std(), x.std(0), rtol=1e-10)
    np.testing.assert_allclose(m.std(ddof=1), x.std(0, ddof=1), rtol=1e-10)


@pytest.mark.parametrize("modality,write,opts", [
    ("image", lambda d: image_dir(d, 60, 0), {}),
    ("xray", lambda d: gray_dir(d, 60, 0, bits=16), {}),
    ("hyperspectral", lambda d: cube_dir(d, 60, 0), {"band_group": 4}),
    ("audio", lambda d: audio_dir(d, 60, 0), {"n_fft": 256, "hop": 64, "n_mels": 32, "patch": 8}),
])
def test_batches_from_disk_train_the_same_model_as_batches_in_memory(modality, write, opts, encoder, tmp_path):
    """With no memory budget every batch is decoded again from its files each epoch; the statistics are
    streamed. The adapter saved is the one trained with everything in memory, bit for bit, and so are
    its predictions."""
    data = str(tmp_path / "data")
    write(data)
    saved, outputs = [], []
    for cache in (2.0, 0.0):
        out = str(tmp_path / f"model-{cache}")
        cfg = AdaptConfig(encoder=encoder, modality=modality, data=data, out=out, epochs=2, batch_size=16,
                          cache_gib=cache, **opts)
        s = train_adapter(cfg, NO_TRACKING, progress=False)
        assert s["reading"].get("inputs_transformed_per_batch", False) == (cache == 0), s["reading"]
        assert s["reading"].get("files_read_from_disk_each_time", 0) == (60 if cache == 0 else 0)
        saved.append((load_file(f"{out}/adapter.safetensors"), json.loads(open(f"{out}/adapter.json").read())))
        outputs.append(predict(out, data)["outputs"])
    (a, spec_a), (b, spec_b) = saved
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert spec_a["preprocessing"] == spec_b["preprocessing"] and spec_a["tokenizer"] == spec_b["tokenizer"]
    assert torch.equal(outputs[0], outputs[1])


def _peak_rss_mib(args: list[str], cwd: str) -> float:
    """Peak resident memory of ``mtx-dist ARGS`` in a fresh process (its own VmHWM: tests.helpers)."""
    probe = ("import runpy, sys; sys.argv = ['mtx-dist', *sys.argv[1:]]\n"
             "from tests.helpers import peak_rss_bytes\n"
             "try:\n    runpy.run_module('mtx_dist.cli', run_name='__main__')\n"
             "finally:\n    print('PEAK_KIB', peak_rss_bytes() // 1024, file=sys.stderr)\n")
    # glibc returns freed blocks above 64 KiB to the system, so the peak is what the process held, not
    # what the allocator kept around after freeing it
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for `tests.helpers` in the probe
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", probe, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return int(res.stderr.split("PEAK_KIB")[1].split()[0]) / 1024


@pytest.mark.slow
def test_memory_stays_flat_on_a_folder_ten_times_larger(encoder, tmp_path):
    """Peak memory of `adapt train` with batches from disk (--cache-gib 0) on 100 and on 1,000 images of
    128 x 128 px: the same within 10 MiB (measured: +0.7 MiB), while keeping the 1,000 in memory costs
    at least 150 MiB more (measured: +380 MiB; each image is 192 KiB decoded, and as large again as a
    model input). No validation split: its inference chunks would be larger on the larger folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for n in (100, 1000):
        for i in range(n):
            d = tmp_path / f"data{n}" / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            img[:, :, i % 2] //= 2  # a learnable difference; the accuracy is not what is measured
            Image.fromarray(img).save(d / f"{i}.png")
    common = ["adapt", "train", "--encoder", encoder, "--modality", "image", "--epochs", "1", "--batch-size", "16",
              "--image-size", "128", "--val-fraction", "0", "--no-tracking", "--quiet"]
    peak = {(n, cache): _peak_rss_mib([*common, "--data", f"data{n}", "--out", f"model-{n}-{cache}",
                                       "--cache-gib", cache], str(tmp_path))
            for n, cache in ((100, "0"), (1000, "0"), (1000, "2"))}
    assert peak[1000, "0"] - peak[100, "0"] <= 10, peak
    assert peak[1000, "2"] - peak[1000, "0"] >= 150, peak
