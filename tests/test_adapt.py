"""Modality adaptation on a frozen micro encoder: real CSV, .wav, .npy and .png files, real MLflow.

The encoder is a freshly initialised micro ContrastiveModel exported with export_encoder: random
frozen blocks, so every accuracy reached here is the tokenizer's and head's doing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mtx_dist.adapt import (
    AdaptConfig,
    DataError,
    EncoderMismatchError,
    FrozenEncoder,
    WavFormatError,
    load_adapter,
    predict,
    train_adapter,
)
from mtx_dist.adapt.audio import hz_to_mel, log_mel, mel_filterbank, read_wav
from mtx_dist.adapt.pointcloud import farthest_point_sample, group_points, knn
from mtx_dist.config import TrackingConfig
from mtx_dist.export import ENCODER_FILE, ExportError, export_encoder, sha256_file
from mtx_dist.models import ContrastiveModel, get_preset
from tests.helpers import run_cli

NO_TRACKING = TrackingConfig(enabled=False)


def make_encoder(out: str, seed: int = 0) -> tuple[str, ContrastiveModel]:
    torch.manual_seed(seed)
    model = ContrastiveModel.from_preset("micro")
    export_encoder(model.state_dict(), get_preset("micro"), "micro", out, {"init_seed": seed})
    return out, model


@pytest.fixture(autouse=True)
def _one_thread():
    """Adapters are tiny: on a shared 2-core machine torch's intra-op threads only contend (a loaded
    box ran these trainings ~10x slower with 2 threads than with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_encoder(str(tmp_path_factory.mktemp("export")))[0]


# -- synthetic data with a learnable signal, written as the files users have -------------------------

def write_wav(path: str, x: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x = np.clip(x, -1, 1)
    frames = np.repeat(x[:, None], channels, axis=1).reshape(-1)
    data = (frames * 32767).astype("<i2").tobytes() if width == 2 else (frames * 127 + 128).astype(np.uint8).tobytes()
    with wave.open(path, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)


def timeseries_csv(path: str, n: int, seed: int, steps: int = 48) -> None:
    """4 classes: sinusoids of 1, 2, 4 or 8 cycles, random phase, noise, two channels (a, b)."""
    rng, freqs, t = np.random.default_rng(seed), [1, 2, 4, 8], np.arange(steps) / steps
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *[f"{c}_t{k}" for c in ("a", "b") for k in range(steps)], "label"])
        for i in range(n):
            k, ph = i % 4, rng.uniform(0, 2 * np.pi)
            a = np.sin(2 * np.pi * freqs[k] * t + ph) + 0.3 * rng.standard_normal(steps)
            b = 0.5 * np.cos(2 * np.pi * freqs[k] * t + ph) + 0.3 * rng.standard_normal(steps)
            w.writerow([f"s{i}", *np.round(a, 4), *np.round(b, 4), f"f{freqs[k]}"])


def tabular_csv(path: str, n: int, seed: int) -> None:
    """y = 1.5 (x1 - 5) - 4 (x2 + 1) + colour effect + noise; cls = (x1 > 5) x colour: 6 classes."""
    rng, effect = np.random.default_rng(seed), {"red": 2.0, "green": 0.0, "blue": -2.0}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "x1", "x2", "colour", "y", "cls"])
        for i in range(n):
            x1, x2, c = rng.normal(5, 2), rng.normal(-1, 0.5), ["red", "green", "blue"][rng.integers(3)]
            y = 1.5 * (x1 - 5) - 4 * (x2 + 1) + effect[c] + 0.2 * rng.standard_normal()
            w.writerow([i, f"{x1:.4f}", "" if i == 7 else f"{x2:.4f}", c, f"{y:.4f}",
                        ("hi" if x1 > 5 else "lo") + "-" + c])


def audio_dir(d: str, n: int, seed: int, rate: int = 8000) -> None:
    """3 classes of pure tones (300 / 1000 / 2500 Hz) with noise, 0.3-0.4 s; every 5th file stereo."""
    rng, tones = np.random.default_rng(seed), {"low": 300, "mid": 1000, "high": 2500}
    for i in range(n):
        name = list(tones)[i % 3]
        t = np.arange(int(rate * rng.uniform(0.3, 0.4))) / rate
        x = 0.5 * np.sin(2 * np.pi * tones[name] * t + rng.uniform(0, 6)) + 0.05 * rng.standard_normal(len(t))
        write_wav(os.path.join(d, name, f"{seed}-{i}.wav"), x, rate, channels=2 if i % 5 == 0 else 1)


def _surface(kind: str, n: int, rng) -> np.ndarray:
    if kind == "sphere":
        p = rng.standard_normal((n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if kind == "cube":
        p = rng.uniform(-1, 1, (n, 3))
        p[np.arange(n), rng.integers(3, size=n)] = np.sign(rng.standard_normal(n))
        return p
    if kind == "cylinder":
        a = rng.uniform(0, 2 * np.pi, n)
        return np.stack([np.cos(a), np.sin(a), rng.uniform(-1.5, 1.5, n)], 1)
    return np.stack([rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), 0.02 * rng.standard_normal(n)], 1)  # plane


def pointcloud_dir(d: str, n: int, seed: int) -> None:
    """4 classes of surfaces, 150-260 points each, random scale and offset."""
    rng, kinds = np.random.default_rng(seed), ["sphere", "cube", "cylinder", "plane"]
    for i in range(n):
        k = kinds[i % 4]
        p = _surface(k, int(rng.integers(150, 260)), rng) * rng.uniform(0.5, 3) + rng.normal(0, 2, 3)
        os.makedirs(os.path.join(d, k), exist_ok=True)
        np.save(os.path.join(d, k, f"{seed}-{i}.npy"), p.astype(np.float32))


def _pattern(rng, i: int, shape: tuple[int, ...]) -> tuple[str, np.ndarray]:
    """Class i % 3 of the image tasks (horizontal stripes, vertical stripes, a disc) on noise, in 0..1."""
    k, size = ["hstripes", "vstripes", "disc"][i % 3], shape[0]
    img = rng.uniform(0, 0.3, shape)
    if k == "hstripes":
        img[::4] += 0.6
    elif k == "vstripes":
        img[:, ::4] += 0.6
    else:
        cy, cx = rng.integers(8, 24, 2)
        yy, xx = np.mgrid[:size, :size]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] += 0.6
    return k, np.clip(img, 0, 1)


def image_dir(d: str, n: int, seed: int, size: int = 32) -> None:
    """3 classes: horizontal stripes, vertical stripes, a disc; half .png, half float .npy."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        k, img = _pattern(rng, i, (size, size, 3))
        os.makedirs(os.path.join(d, k), exist_ok=True)
        if i % 2:
            Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(d, k, f"{seed}-{i}.png"))
        else:
            np.save(os.path.join(d, k, f"{seed}-{i}.npy"), img.astype(np.float32))


def gray_dir(d: str, n: int, seed: int, size: int = 32, bits: int = 16) -> None:
    """Single-channel images, 3 classes (horizontal stripes, vertical stripes, a disc, on noise):
    ``bits``-bit PNGs (16: 'I;16', as x-ray detectors write them; 8: 'L') and float .npy, alternately;
    with 16 bits every fourth a 12-bit DICOM instead."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        k, img = _pattern(rng, i, (size, size))
        os.makedirs(os.path.join(d, k), exist_ok=True)
        if i % 4 == 3 and bits == 16:
            write_dicom(os.path.join(d, k, f"{seed}-{i}.dcm"), (img * 4095).astype(np.uint16), 12)
        elif i % 2 and bits == 16:
            Image.fromarray((img * 65535).astype(np.uint16)).save(os.path.join(d, k, f"{seed}-{i}.png"))
        elif i % 2:
            Image.fromarray((img * 255).astype(np.uint8), mode="L").save(os.path.join(d, k, f"{seed}-{i}.png"))
        else:
            np.save(os.path.join(d, k, f"{seed}-{i}.npy"), img.astype(np.float32))


def write_dicom(path: str, pixels: np.ndarray, bits: int, photometric: str = "MONOCHROME2",
                signed: bool = False) -> None:
    """One greyscale image as an uncompressed DICOM file (Secondary Capture), ``bits`` stored of 16."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", photometric, 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def cube_dir(d: str, n: int, seed: int, size: int = 6, bands: int = 20) -> None:
    """Hyperspectral patches (H, W, bands), 3 classes told apart by where their spectrum peaks, with
    per-pixel brightness and noise (float .npy)."""
    rng = np.random.default_rng(seed)
    b = np.arange(bands)
    for i in range(n):
        k = i % 3
        spectrum = np.exp(-0.5 * ((b - (4 + 6 * k)) / 2.0) ** 2)
        cube = rng.uniform(0.5, 1.5, (size, size, 1)) * spectrum + rng.normal(0, 0.15, (size, size, bands))
        os.makedirs(os.path.join(d, f"class{k}"), exist_ok=True)
        np.save(os.path.join(d, f"class{k}", f"{seed}-{i}.npy"), cube.astype(np.float32))


def imu_dir(d: str, n: int, seed: int, steps: int = 64) -> None:
    """IMU-like recordings (6 channels: accelerometer + gyroscope, T steps) as .npy (channels, T), 3
    activities: still (noise), walking (a 2 Hz-like gait on the vertical axis), turning (gyroscope z)."""
    rng, t = np.random.default_rng(seed), np.arange(steps) / steps
    for i in range(n):
        k = ["still", "walk", "turn"][i % 3]
        x = 0.2 * rng.standard_normal((6, steps))
        x[2] += 1.0  # gravity on the accelerometer's z axis
        if k == "walk":
            x[2] += np.sin(2 * np.pi * 6 * t + rng.uniform(0, 6.3))
        elif k == "turn":
            x[5] += 1.5 * np.sin(np.pi * t)
        os.makedirs(os.path.join(d, k), exist_ok=True)
        np.save(os.path.join(d, k, f"{seed}-{i}.npy"), x.astype(np.float32))


def video_dir(d: str, n: int, seed: int, frames: int = 8, size: int = 16) -> None:
    """Clips of a bright square on noise, 3 classes: still, blinking (on and off by frame), sliding
    across; a third each (T, H, W, 3) uint8 .npy, animated .gif and .mp4."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        k = ["still", "blink", "slide"][i % 3]
        clip = rng.uniform(0, 0.3, (frames, size, size, 3))
        y, x = rng.integers(0, size - 6, 2)
        for t in range(frames):
            if k == "blink" and t % 2:
                continue
            dx = 2 * t if k == "slide" else 0
            clip[t, y:y + 6, min(x + dx, size - 6):min(x + dx, size - 6) + 6] += 0.7
        clip = (np.clip(clip, 0, 1) * 255).astype(np.uint8)
        os.makedirs(os.path.join(d, k), exist_ok=True)
        kind = (i // 3) % 3  # every class in every format
        if kind == 1:
            frames_ = [Image.fromarray(f) for f in clip]
            frames_[0].save(os.path.join(d, k, f"{seed}-{i}.gif"), save_all=True, append_images=frames_[1:])
        elif kind == 2:
            write_mp4(os.path.join(d, k, f"{seed}-{i}.mp4"), clip)
        else:
            np.save(os.path.join(d, k, f"{seed}-{i}.npy"), clip)


def write_mp4(path: str, clip: np.ndarray, fps: int = 8) -> None:
    """(T, H, W, 3) uint8 -> an MPEG-4 part 2 .mp4 (FFmpeg's own encoder, inside the PyAV wheel)."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        stream.bit_rate = 20_000_000  # near-lossless (what is left is 4:2:0 chroma): the data's signal is learned
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush


def text_csv(path: str, n: int, seed: int) -> None:
    """3 topics (animals, vehicles, food): a sentence of topic words and filler words in random order."""
    rng = np.random.default_rng(seed)
    topics = {"animals": ["dog", "cat", "horse", "bird", "fish"], "vehicles": ["car", "bus", "train", "bike", "boat"],
              "food": ["bread", "apple", "rice", "cheese", "soup"]}
    filler = ["the", "a", "today", "near", "my", "big", "small", "old", "new", "very"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i in range(n):
            topic = list(topics)[i % 3]
            words = list(rng.choice(topics[topic], 2)) + list(rng.choice(filler, 4))
            rng.shuffle(words)
            w.writerow([i, " ".join(words), topic])


def graph_dir(d: str, n: int, seed: int) -> None:
    """Graphs of 6-10 nodes, 3 classes: a cycle, a star, a complete graph; node feature: the degree;
    half .json, half .npz, edges listed both ways in some."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        k, size = ["cycle", "star", "complete"][i % 3], int(rng.integers(6, 11))
        if k == "cycle":
            edges = [(j, (j + 1) % size) for j in range(size)]
        elif k == "star":
            edges = [(0, j) for j in range(1, size)]
        else:
            edges = [(a, b) for a in range(size) for b in range(a + 1, size)]
        if i % 4 == 0:
            edges += [(b, a) for a, b in edges]
        perm = rng.permutation(size)
        edges = [(int(perm[a]), int(perm[b])) for a, b in edges]
        degree = np.zeros(size)
        for a, b in set(tuple(sorted(e)) for e in edges):
            degree[a] += 1
            degree[b] += 1
        os.makedirs(os.path.join(d, k), exist_ok=True)
        if i % 2:
            with open(os.path.join(d, k, f"{seed}-{i}.json"), "w") as f:
                json.dump({"nodes": [[float(v)] for v in degree], "edges": edges}, f)
        else:
            np.savez(os.path.join(d, k, f"{seed}-{i}.npz"), x=degree[:, None].astype(np.float32),
                     edge_index=np.asarray(edges, np.int64).T)


# -- references --------------------------------------------------------------------------------------

def reference_fbank(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """HTK triangles written out filter by filter, bin by bin."""
    to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    pts = [to_hz(m) for m in np.linspace(to_mel(0.0), to_mel(rate / 2), n_mels + 2)]
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * rate / n_fft
            if lo <= f <= c:
                fb[k, m] = (f - lo) / (c - lo)
            elif c < f <= hi:
                fb[k, m] = (hi - f) / (hi - c)
    return fb


def reference_log_mel(x: np.ndarray, rate: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    """Frame by frame: zero-pad n_fft/2 each side, periodic Hann, |rfft|^2, mel, log."""
    padded = np.concatenate([np.zeros(n_fft // 2), x, np.zeros(n_fft // 2)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = [padded[s:s + n_fft] * window for s in range(0, len(padded) - n_fft + 1, hop)]
    power = np.abs(np.fft.rfft(np.array(frames), axis=1)) ** 2
    return np.log(np.maximum(power @ reference_fbank(rate, n_fft, n_mels), 1e-10)).T


def test_log_mel_matches_numpy_reference():
    assert abs(float(hz_to_mel(1000.0)) - 1000.0) < 0.05  # HTK: 1000 Hz is ~1000 mel by construction
    fb = mel_filterbank(8000, 256, 24).numpy()
    np.testing.assert_allclose(fb, reference_fbank(8000, 256, 24), atol=1e-6)
    assert fb.max() <= 1.0 + 1e-6 and (fb.sum(axis=0) > 0).all()  # peak 1, no empty band
    x = np.random.default_rng(0).standard_normal(2000).astype(np.float32) * 0.3
    ours = log_mel(torch.from_numpy(x)[None].double(), mel_filterbank(8000, 256, 24).double(), 256, 64)[0].numpy()
    ref = reference_log_mel(x.astype(np.float64), 8000, 256, 64, 24)
    assert ours.shape == ref.shape == (24, 1 + 2000 // 64)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("tone", [300.0, 1000.0, 2500.0])
def test_pure_tone_peaks_in_its_mel_band(tone):
    rate, n_fft, n_mels = 8000, 512, 40
    t = np.arange(rate // 2) / rate
    spec = log_mel(torch.tensor(np.sin(2 * np.pi * tone * t), dtype=torch.float32)[None],
                   mel_filterbank(rate, n_fft, n_mels), n_fft, 128)[0, :, 2:-2].mean(dim=1)
    fb = reference_fbank(rate, n_fft, n_mels)
    bin_ = round(tone * n_fft / rate)
    assert int(spec.argmax()) == int(fb[bin_].argmax())  # the band whose triangle is highest at the tone


def test_fps_and_knn_match_bruteforce():
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((3, 50, 4))  # xyz + one feature channel
    x = torch.from_numpy(pts)
    idx = farthest_point_sample(x[..., :3], 8).numpy()
    for b in range(3):
        xyz, chosen, dist = pts[b, :, :3], [0], np.full(50, np.inf)
        for _ in range(7):
            dist = np.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(axis=1))
            chosen.append(int(np.argmax(dist)))
        assert idx[b].tolist() == chosen
        q = xyz[chosen]
        ref = np.argsort(((q[:, None] - xyz[None]) ** 2).sum(-1), axis=1)[:, :5]
        assert knn(torch.from_numpy(q)[None], torch.from_numpy(xyz)[None], 5)[0].numpy().tolist() == ref.tolist()
        centres, rel = group_points(x[b:b + 1], 8, 5)
        np.testing.assert_array_equal(centres[0].numpy(), q)
        np.testing.assert_allclose(rel[0].numpy(), np.concatenate(
            [pts[b][ref][..., :3] - q[:, None], pts[b][ref][..., 3:]], axis=-1), atol=0)


def test_frozen_encoder_is_the_export(tmp_path):
    out, model = make_encoder(str(tmp_path / "export"), seed=3)
    enc = FrozenEncoder(out)
    assert enc.sha256 == sha256_file(os.path.join(out, ENCODER_FILE))
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.training
    enc.train()
    assert not any(m.training for m in enc.modules())
    x = torch.randn(2, 7, 64)
    ref = x
    for blk in model.visual.blocks:
        ref = blk(ref)
    torch.testing.assert_close(enc(x), ref, rtol=0, atol=1e-6 * max(1.0, float(ref.abs().max())))  # ~4 here
    # A file changed behind the manifest's back is refused before anything is built on it.
    with open(os.path.join(out, ENCODER_FILE), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(ExportError, match="sha256"):
        FrozenEncoder(out)


def test_encoder_equals_meta_transformer_construction(timm, encoder):
    """Meta-Transformer loads its encoder into timm Blocks with strict=True; ours must compute the same."""
    from timm.models.vision_transformer import Block

    blocks = torch.nn.Sequential(*[Block(dim=64, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
                                         norm_layer=torch.nn.LayerNorm, act_layer=torch.nn.GELU) for _ in range(2)])
    blocks.load_state_dict(load_file(os.path.join(encoder, ENCODER_FILE)), strict=True)
    x = torch.randn(3, 9, 64)
    want = blocks.eval()(x)  # relative to the features' magnitude (~4 here): timm's summation order, fp32
    torch.testing.assert_close(FrozenEncoder(encoder)(x), want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))


def test_wav_reader(tmp_path):
    x = np.sin(np.arange(800) / 5.0) * 0.5
    write_wav(str(tmp_path / "s.wav"), x, 8000, channels=2)
    mono, rate = read_wav(str(tmp_path / "s.wav"))
    assert rate == 8000 and mono.shape == (800,)
    np.testing.assert_allclose(mono, x, atol=2 / 32768)  # 16-bit quantisation
    write_wav(str(tmp_path / "u8.wav"), x, 8000, width=1)
    with pytest.raises(WavFormatError, match="8-bit"):
        read_wav(str(tmp_path / "u8.wav"))
    with pytest.raises(WavFormatError, match="16000"):
        read_wav(str(tmp_path / "s.wav"), sample_rate=16000)
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEnope")
    with pytest.raises(WavFormatError):
        read_wav(str(tmp_path / "junk.wav"))


# -- training ----------------------------------------------------------------------------------------

# modality -> (data writer, options, classes). Chance = 1 / classes; every task must reach >= 0.8 on
# its validation split AND on a fresh test set (another seed) read back through predict().
TASKS = {
    "timeseries": (lambda d, n, s: timeseries_csv(f"{d}/series.csv", n, s), "series.csv",
                   {"patch": 8, "epochs": 15, "lr": 3e-3}, 4, 96),
    "tabular": (lambda d, n, s: tabular_csv(f"{d}/table.csv", n, s), "table.csv",
                {"target": "cls", "ignore": "id,y", "epochs": 20, "lr": 3e-3}, 6, 150),
    "audio": (lambda d, n, s: audio_dir(f"{d}/audio", n, s), "audio",
              {"n_fft": 256, "hop": 64, "n_mels": 32, "patch": 8, "epochs": 15, "lr": 3e-3}, 3, 60),
    "pointcloud": (lambda d, n, s: pointcloud_dir(f"{d}/clouds", n, s), "clouds",
                   {"points": 128, "groups": 16, "neighbours": 8, "pool": "mean", "epochs": 25, "lr": 3e-3}, 4, 80),
    "image": (lambda d, n, s: image_dir(f"{d}/images", n, s), "images", {"epochs": 15, "lr": 3e-3}, 3, 60),
    "xray": (lambda d, n, s: gray_dir(f"{d}/xray", n, s, bits=16), "xray", {"epochs": 15, "lr": 3e-3}, 3, 60),
    "infrared": (lambda d, n, s: gray_dir(f"{d}/ir", n, s, bits=8), "ir", {"epochs": 15, "lr": 3e-3}, 3, 60),
    "hyperspectral": (lambda d, n, s: cube_dir(f"{d}/cubes", n, s), "cubes",
                      {"epochs": 15, "lr": 3e-3, "band_group": 4}, 3, 60),
    "imu": (lambda d, n, s: imu_dir(f"{d}/imu", n, s), "imu", {"patch": 8, "epochs": 15, "lr": 3e-3,
                                                                "sample_rate": 50}, 3, 60),
    "video": (lambda d, n, s: video_dir(f"{d}/clips", n, s), "clips", {"epochs": 25, "lr": 3e-3, "image_size": 16,
                                                                        "patch": 8}, 3, 90),
    "text": (lambda d, n, s: text_csv(f"{d}/texts.csv", n, s), "texts.csv", {"epochs": 15, "lr": 3e-3,
                                                                             "context_length": 16}, 3, 60),
    "graph": (lambda d, n, s: graph_dir(f"{d}/graphs", n, s), "graphs", {"epochs": 30, "lr": 3e-3}, 3, 60),
}


@pytest.mark.slow
@pytest.mark.parametrize("modality", list(TASKS))
def test_modality_learns_above_chance(modality, encoder, tmp_path):
    write, name, opts, classes, n = TASKS[modality]
    os.makedirs(tmp_path / "train")
    os.makedirs(tmp_path / "test")
    write(str(tmp_path / "train"), n, 0)
    write(str(tmp_path / "test"), n // 2, 1)
    cfg = AdaptConfig(encoder=encoder, modality=modality, data=str(tmp_path / "train" / name),
                      out=str(tmp_path / "model"), batch_size=16, val_fraction=0.25, **opts)
    enc_file = os.path.join(encoder, ENCODER_FILE)
    sha_before, weights_before = sha256_file(enc_file), load_file(enc_file)
    s = train_adapter(cfg, NO_TRACKING, progress=False)
    chance = 1 / classes
    assert s["outputs"] == classes and chance <= 0.34
    assert s["metrics"]["val_accuracy"] >= 0.8, (s["metrics"], chance)
    r = predict(str(tmp_path / "model"), str(tmp_path / "test" / name), out=str(tmp_path / "preds.csv"))
    assert r["metrics"]["accuracy"] >= 0.8, (r["metrics"], chance)
    with open(tmp_path / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(r["ids"]) == n // 2 and len(rows[0]) == 2 + classes  # id, prediction, p_<class>

    # the encoder: its file and weights unchanged, no gradient; the saved model predicts as the trained one
    model = s["model"]
    assert sha256_file(enc_file) == sha_before == s["encoder_sha256"]
    assert all(torch.equal(v, weights_before[k]) for k, v in model.encoder.blocks.state_dict().items())
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for k, p in model.named_parameters() if not k.startswith("encoder."))
    from mtx_dist.adapt.data import Inputs
    from mtx_dist.adapt.train import IO, infer
    spec = json.loads((tmp_path / "model" / "adapter.json").read_text())
    pre, settings = spec["preprocessing"]["input"], spec["tokenizer"]
    raw = IO[modality].read(str(tmp_path / "test" / name), cfg, labelled=False, pre=pre)
    assert torch.equal(r["outputs"], infer(model, Inputs(IO[modality], raw, pre, settings, 2**30)))  # bitwise


@pytest.mark.slow
def test_regression_frozen_encoder_save_reload(encoder, tmp_path):
    """Tabular regression; the encoder file and weights untouched; gradients only in tokenizer and head;
    save -> reload -> predict reproduces the trained model exactly; another encoder is refused."""
    tabular_csv(str(tmp_path / "t.csv"), 150, 0)
    enc_file = os.path.join(encoder, ENCODER_FILE)
    sha_before, weights_before = sha256_file(enc_file), load_file(enc_file)
    cfg = AdaptConfig(encoder=encoder, modality="tabular", data=str(tmp_path / "t.csv"), target="y",
                      task="regression", ignore="id,cls", out=str(tmp_path / "m"), epochs=20, lr=3e-3,
                      batch_size=16, val_fraction=0.25)
    s = train_adapter(cfg, NO_TRACKING, progress=False)
    assert s["metrics"]["val_r2"] >= 0.8, s["metrics"]  # a constant predictor scores 0
    assert s["reading"]["numeric_values_missing_filled_with_mean"] == 1  # the empty x2 cell of row 7

    model = s["model"]
    assert sha256_file(enc_file) == sha_before == s["encoder_sha256"]
    for k, v in model.encoder.blocks.state_dict().items():
        assert torch.equal(v, weights_before[k]), k
    assert all(p.grad is None for p in model.encoder.parameters())
    trained = [(k, p) for k, p in model.named_parameters() if not k.startswith("encoder.")]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trained)
    model.train()
    assert not any(m.training for m in model.encoder.modules()) and model.tokenizer.training

    spec = json.loads((tmp_path / "m" / "adapter.json").read_text())
    assert spec["encoder"] == {"path": os.path.abspath(encoder), "sha256": sha_before, "width": 64, "depth": 2,
                               "heads": 2}
    assert set(load_file(str(tmp_path / "m" / "adapter.safetensors"))) == {k for k, _ in trained}

    from mtx_dist.adapt.data import TabularIO
    from mtx_dist.adapt.train import infer
    raw = TabularIO.read(str(tmp_path / "t.csv"), cfg, labelled=False)
    x = TabularIO.transform(raw, spec["preprocessing"]["input"], spec["tokenizer"])
    expected = infer(model, x).squeeze(-1).double() * spec["preprocessing"]["target"]["std"] \
        + spec["preprocessing"]["target"]["mean"]
    first = predict(str(tmp_path / "m"), str(tmp_path / "t.csv"))
    second = predict(str(tmp_path / "m"), str(tmp_path / "t.csv"))
    assert first["predictions"] == second["predictions"] == expected.tolist()  # bitwise

    other = str(tmp_path / "other")
    shutil.copytree(encoder, other)
    make_encoder(other, seed=1)  # a valid export of different weights
    with pytest.raises(EncoderMismatchError, match="sha256"):
        load_adapter(str(tmp_path / "m"), encoder_dir=other)
    # The same weights moved elsewhere are fine.
    moved = str(tmp_path / "moved")
    shutil.copytree(encoder, moved)
    assert predict(str(tmp_path / "m"), str(tmp_path / "t.csv"), encoder_dir=moved)["predictions"] == \
        first["predictions"]


@pytest.mark.slow
def test_bad_inputs_are_named(encoder, tmp_path):
    tabular_csv(str(tmp_path / "t.csv"), 20, 0)
    base = {"out": str(tmp_path / "m")}
    with pytest.raises(DataError, match="'price'"):
        train_adapter(AdaptConfig(encoder=encoder, out=base["out"], modality="tabular", data=str(tmp_path / "t.csv"),
                                  target="price"), NO_TRACKING)
    with pytest.raises(DataError, match="no time-step columns"):
        train_adapter(AdaptConfig(encoder=encoder, out=base["out"], modality="timeseries",
                                  data=str(tmp_path / "t.csv"), target="cls"), NO_TRACKING)
    rows = (tmp_path / "t.csv").read_text().splitlines()
    (tmp_path / "gap.csv").write_text("t0,t1,t2,label\n1,2,3,a\n1,,3,b\n")
    with pytest.raises(DataError, match="'t1' is empty"):
        train_adapter(AdaptConfig(encoder=encoder, out=base["out"], modality="timeseries",
                                  data=str(tmp_path / "gap.csv")), NO_TRACKING)
    audio_dir(str(tmp_path / "a"), 4, 0)
    write_wav(str(tmp_path / "a" / "loose.wav"), np.zeros(100), 8000)
    with pytest.raises(DataError, match="outside class sub-folders"):
        train_adapter(AdaptConfig(encoder=encoder, out=base["out"], modality="audio", data=str(tmp_path / "a")),
                      NO_TRACKING)
    os.remove(tmp_path / "a" / "loose.wav")
    write_wav(str(tmp_path / "a" / "low" / "fast.wav"), np.zeros(100), 16000)
    with pytest.raises(WavFormatError, match="16000 Hz"):
        train_adapter(AdaptConfig(encoder=encoder, out=base["out"], modality="audio", data=str(tmp_path / "a")),
                      NO_TRACKING)
    s = train_adapter(AdaptConfig(encoder=encoder, out=str(tmp_path / "am"), modality="audio", data=str(tmp_path / "a"),
                                  skip_bad=True, epochs=1, n_fft=256, hop=64, n_mels=32, patch=8), NO_TRACKING,
                      progress=False)
    assert s["samples"] == 4 and s["reading"]["bad_files_skipped"] == 1  # the 16 kHz file, counted
    assert "fast.wav" in s["reading"]["bad_files_first"][0]
    from mtx_dist.adapt import AdaptError
    with pytest.raises(AdaptError, match="config key 'adapt.modality' = 'smell': allowed values are 'timeseries'"):
        AdaptConfig(encoder=encoder, out="x", data="y", modality="smell").validate()
    with pytest.raises(AdaptError, match="config key 'adapt.epochs' = 0: must be >= 1"):  # the training config's words
        AdaptConfig(encoder=encoder, out="x", data="y", modality="image", epochs=0).validate()
    # A table missing a feature column the model was trained with.
    train_adapter(AdaptConfig(encoder=encoder, out=base["out"], modality="tabular", data=str(tmp_path / "t.csv"),
                              target="cls", ignore="id,y", epochs=1), NO_TRACKING, progress=False)
    (tmp_path / "less.csv").write_text("\n".join(r.rsplit(",", 3)[0] for r in rows) + "\n")  # drops colour,y,cls
    with pytest.raises(DataError, match="'colour'"):
        predict(base["out"], str(tmp_path / "less.csv"))


@pytest.mark.slow
def test_cli_train_then_predict(encoder, tmp_path):
    """`mtx-dist adapt train` on a CSV (tracked in the default sqlite store), then `adapt predict`."""
    tabular_csv(str(tmp_path / "train.csv"), 150, 0)
    tabular_csv(str(tmp_path / "new.csv"), 40, 1)
    env = {"OMP_NUM_THREADS": "1"}
    common = ["adapt", "train", "--encoder", encoder, "--modality", "tabular", "--data", "train.csv",
              "--ignore", "id,y", "--out", "model", "--quiet"]
    res = run_cli([*common, "--target", "cls", "--epochs", "20", "--lr", "3e-3", "--batch-size", "16"],
                  cwd=str(tmp_path), timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "adapted tabular (classification, 6 outputs): 120 training / 30 validation samples" in res.stdout
    run_id = res.stdout.split("mlflow: run ")[1].split()[0]

    from mlflow.tracking import MlflowClient
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    spec = json.loads((tmp_path / "model" / "adapter.json").read_text())
    assert run.data.params["adapt.modality"] == "tabular"
    assert run.data.params["encoder.sha256"] == spec["encoder"]["sha256"] == sha256_file(f"{encoder}/{ENCODER_FILE}")
    assert run.data.metrics["val_accuracy"] >= 0.8 and "train_loss" in run.data.metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert len(client.get_metric_history(run_id, "train_loss")) == 20
    assert {a.path for a in client.list_artifacts(run_id, "adapter")} >= {"adapter/adapter.json",
                                                                         "adapter/adapter.safetensors"}

    res = run_cli(["adapt", "predict", "--model", "model", "--data", "new.csv", "--out", "preds.csv"],
                  cwd=str(tmp_path), timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "predicted 40 samples -> preds.csv" in res.stdout
    with open(tmp_path / "preds.csv") as f:
        preds = list(csv.DictReader(f))
    with open(tmp_path / "new.csv") as f:
        truth = [r["cls"] for r in csv.DictReader(f)]
    assert [r["id"] for r in preds] == [str(i) for i in range(40)]
    assert sum(p["prediction"] == t for p, t in zip(preds, truth)) / 40 >= 0.8  # chance 1/6

    res = run_cli([*common, "--target", "price", "--no-tracking"], cwd=str(tmp_path), timeout=300, env=env)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("mtx-dist adapt: DataError: train.csv: no column 'price'")
    assert len(res.stderr.strip().splitlines()) == 1


def test_parquet_reads_like_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtx_dist.adapt.data import TabularIO, read_table

    tabular_csv(str(tmp_path / "t.csv"), 30, 0)
    columns, rows = read_table(str(tmp_path / "t.csv"))
    typed = {c: [None if r[c] == "" else (r[c] if c in ("colour", "cls") else float(r[c])) for r in rows]
             for c in columns}
    pq.write_table(pa.table(typed), str(tmp_path / "t.parquet"))
    cfg = AdaptConfig(target="y", ignore="id,cls")
    tensors = []
    for name in ("t.csv", "t.parquet"):
        raw = TabularIO.read(str(tmp_path / name), cfg, labelled=True)
        pre, settings = TabularIO.fit(raw, list(range(20)), cfg, {})
        assert settings == {"n_numeric": 2, "vocab_sizes": [4]}  # x1, x2 numeric; colour: 3 values + unknown
        tensors.append(TabularIO.transform(raw, pre, settings))
    assert torch.equal(tensors[0], tensors[1])


def test_single_channel_modalities_read_bit_depths_and_refuse_colour(tmp_path):
    """xray/infrared: 16- and 8-bit PNGs and .npy arrays read as one channel in 0..1; a colour image is
    refused naming its file; an RGB file of a grey picture is read as its one channel."""
    from PIL import Image

    from mtx_dist.adapt.errors import DataError
    from mtx_dist.adapt.files import GrayImageIO

    d = tmp_path / "x" / "a"
    os.makedirs(d)
    Image.fromarray(np.full((4, 6), 65535, np.uint16)).save(d / "white16.png")
    Image.fromarray(np.full((4, 6), 51, np.uint8), mode="L").save(d / "grey8.png")
    Image.fromarray(np.full((4, 6, 3), 102, np.uint8)).save(d / "rgbgrey.png")
    np.save(d / "half.npy", np.full((4, 6), 0.5, np.float32))
    cfg = AdaptConfig(modality="xray", target="label")
    raw = GrayImageIO.read(str(tmp_path / "x"), cfg, labelled=True)
    values = {os.path.basename(i): float(a.mean()) for i, a in zip(raw.ids, raw.items)}
    assert values == {"grey8.png": pytest.approx(0.2), "half.npy": 0.5, "rgbgrey.png": pytest.approx(0.4),
                      "white16.png": 1.0}
    assert all(a.shape == (4, 6) for a in raw.items)
    colour = np.zeros((4, 6, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(d / "red.png")
    with pytest.raises(DataError, match="red.png: a colour image"):
        GrayImageIO.read(str(tmp_path / "x"), cfg, labelled=True)


def test_dicom_images_read_by_bit_depth_and_photometric_interpretation(tmp_path, monkeypatch):
    """12-bit stored values scale by 4095; MONOCHROME1 is inverted (bright = dense in every file); signed
    values start at 0; a broken file and a missing pydicom are named."""
    from mtx_dist.adapt.errors import DataError
    from mtx_dist.adapt.files import GrayImageIO

    d = tmp_path / "x" / "a"
    os.makedirs(d)
    ramp = np.arange(24, dtype=np.uint16).reshape(4, 6) * 150  # 0 .. 3450 of 4095
    write_dicom(str(d / "m2.dcm"), ramp, 12)
    write_dicom(str(d / "m1.dcm"), ramp, 12, photometric="MONOCHROME1")
    write_dicom(str(d / "signed.dcm"), ramp.astype(np.int16) - 2048, 12, signed=True)
    raw = GrayImageIO.read(str(tmp_path / "x"), AdaptConfig(modality="xray", target="label"), labelled=True)
    got = {os.path.basename(i): a for i, a in zip(raw.ids, raw.items)}
    expected = (ramp / 4095).astype(np.float32)
    np.testing.assert_allclose(got["m2.dcm"], expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(got["m1.dcm"], 1 - expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(got["signed.dcm"], expected, rtol=0, atol=1e-7)
    write_dicom(str(d / "palette.dcm"), ramp, 12, photometric="PALETTE COLOR")
    with pytest.raises(DataError, match="palette.dcm: DICOM photometric interpretation PALETTE COLOR"):
        GrayImageIO.read(str(tmp_path / "x"), AdaptConfig(modality="xray", target="label"), labelled=True)
    os.remove(d / "palette.dcm")
    (d / "broken.dcm").write_bytes(b"DICM" * 10)
    with pytest.raises(DataError, match="broken.dcm: not a readable DICOM image"):
        GrayImageIO.read(str(tmp_path / "x"), AdaptConfig(modality="xray", target="label"), labelled=True)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # the optional extra not installed
    with pytest.raises(DataError, match=r"broken.dcm: DICOM files need pydicom: pip install 'mtx-dist\[dicom\]'"):
        GrayImageIO.read(str(tmp_path / "x"), AdaptConfig(modality="xray", target="label"), labelled=True)


def test_hyperspectral_band_count_is_recorded_and_checked(encoder, tmp_path):
    """The cubes' shape is saved with the model; a cube with other bands is refused naming the file, at
    training (against the first cube) and at prediction (against the model)."""
    from mtx_dist.adapt.errors import DataError

    cube_dir(str(tmp_path / "train"), 12, 0)
    cfg = AdaptConfig(encoder=encoder, modality="hyperspectral", data=str(tmp_path / "train"), out=str(tmp_path / "m"),
                      epochs=1, band_group=4, batch_size=4)
    train_adapter(cfg, NO_TRACKING, progress=False)
    spec = json.loads((tmp_path / "m" / "adapter.json").read_text())
    assert spec["tokenizer"]["bands"] == 20 and spec["preprocessing"]["input"]["shape"] == [6, 6, 20]
    cube_dir(str(tmp_path / "other"), 3, 1, bands=16)
    with pytest.raises(DataError, match=r"1-0.npy: shape \(6, 6, 16\); the model was trained on \(6, 6, 20\)"):
        predict(str(tmp_path / "m"), str(tmp_path / "other"))
    cube_dir(str(tmp_path / "train" / "odd"), 1, 2, bands=16)
    with pytest.raises(DataError, match="every cube needs the same bands and size"):
        train_adapter(cfg, NO_TRACKING, progress=False)


def test_imu_records_its_rate_and_refuses_other_channels(encoder, tmp_path):
    from mtx_dist.adapt.errors import DataError

    imu_dir(str(tmp_path / "train"), 12, 0)
    cfg = AdaptConfig(encoder=encoder, modality="imu", data=str(tmp_path / "train"), out=str(tmp_path / "m"),
                      epochs=1, patch=8, sample_rate=50, batch_size=4)
    train_adapter(cfg, NO_TRACKING, progress=False)
    spec = json.loads((tmp_path / "m" / "adapter.json").read_text())
    assert spec["preprocessing"]["input"]["sample_rate_hz"] == 50 and spec["tokenizer"]["channels"] == 6
    os.makedirs(tmp_path / "three")
    np.save(tmp_path / "three" / "r.npy", np.zeros((3, 64), np.float32))
    with pytest.raises(DataError, match=r"r.npy: shape \(3, 64\); the model was trained on 6 channels x 64 steps"):
        predict(str(tmp_path / "m"), str(tmp_path / "three"))


def test_video_clips_without_frames_or_a_decoder_are_refused_naming_the_file(tmp_path, monkeypatch):
    from mtx_dist.adapt.errors import DataError
    from mtx_dist.adapt.video import VideoIO

    d = tmp_path / "v" / "a"
    os.makedirs(d)
    np.save(d / "empty.npy", np.zeros((0, 8, 8, 3), np.uint8))
    cfg = AdaptConfig(modality="video", target="label")
    with pytest.raises(DataError, match="empty.npy: a clip with no frames"):
        VideoIO.read(str(tmp_path / "v"), cfg, labelled=True)
    os.remove(d / "empty.npy")
    (d / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")  # a header and nothing else
    with pytest.raises(DataError, match="clip.mp4: not a readable clip"):
        VideoIO.read(str(tmp_path / "v"), cfg, labelled=True)
    np.save(d / "good.npy", np.zeros((2, 8, 8, 3), np.uint8))
    raw = VideoIO.read(str(tmp_path / "v"), AdaptConfig(modality="video", target="label", skip_bad=True), labelled=True)
    assert len(raw.items) == 1 and raw.info["bad_files_skipped"] == 1
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "av", None)  # PyAV not installed: the optional extra's hint
        with pytest.raises(DataError, match=r"clip.mp4: mp4 clips need the video decoder: pip install 'mtx-dist\[video\]'"):
            VideoIO.read(str(tmp_path / "v"), cfg, labelled=True)


def test_mp4_clips_decode_to_their_frames(tmp_path, monkeypatch):
    from mtx_dist.adapt.video import decode_container

    t, y, x = np.meshgrid(np.arange(6), np.arange(32), np.arange(48), indexing="ij")
    clip = np.stack([128 + 60 * np.sin(x / 7 + t), 128 + 60 * np.cos(y / 5 - t), 100 + 10 * t + 0 * x], -1)
    clip = clip.astype(np.uint8)  # smooth, so the codec's loss stays small
    write_mp4(str(tmp_path / "c.mp4"), clip)
    frames = decode_container(str(tmp_path / "c.mp4"))
    assert frames.shape == clip.shape and frames.dtype == np.uint8
    error = np.abs(frames.astype(float) - clip).mean()
    assert error < 4, error  # mean absolute error in 0..255 levels (lossy MPEG-4, 4:2:0 chroma)

    # a clip longer than MAX_DECODED_FRAMES keeps that many, evenly spaced: frame k shows brightness k
    from mtx_dist.adapt import video

    monkeypatch.setattr(video, "MAX_DECODED_FRAMES", 5)
    long = np.repeat((np.arange(40, dtype=np.uint8) * 6)[:, None, None, None], 16, 1).repeat(16, 2).repeat(3, 3)
    write_mp4(str(tmp_path / "long.mp4"), long)
    kept = video.decode_container(str(tmp_path / "long.mp4"))
    levels = kept.reshape(len(kept), -1).mean(1) / 6
    np.testing.assert_allclose(levels, [0, 9.75, 19.5, 29.25, 39], atol=1.0)  # linspace(0, 39, 5), rounded


def test_text_needs_its_text_column(encoder, tmp_path):
    from mtx_dist.adapt.errors import DataError

    text_csv(str(tmp_path / "t.csv"), 6, 0)
    cfg = AdaptConfig(encoder=encoder, modality="text", data=str(tmp_path / "t.csv"), out=str(tmp_path / "m"),
                      text_column="caption", epochs=1)
    with pytest.raises(DataError, match=r"t.csv: no text column 'caption' \(--text-column\)"):
        train_adapter(cfg, NO_TRACKING, progress=False)


def test_graph_edge_to_a_missing_node_is_refused_naming_the_file(tmp_path):
    from mtx_dist.adapt.errors import DataError
    from mtx_dist.adapt.graph import GraphIO, laplacian_ids

    d = tmp_path / "g" / "a"
    os.makedirs(d)
    (d / "bad.json").write_text(json.dumps({"nodes": [[1.0], [2.0], [1.0]], "edges": [[0, 1], [1, 5]]}))
    cfg = AdaptConfig(modality="graph", target="label")
    with pytest.raises(DataError, match=r"bad.json: edge 1 -> 5 names a missing node \(the graph has 3 nodes"):
        GraphIO.read(str(tmp_path / "g"), cfg, labelled=True)
    # the identifiers are orthonormal eigenvectors of the normalised Laplacian (a 4-cycle here)
    p = laplacian_ids(4, np.array([[0, 1], [1, 2], [2, 3], [0, 3]]), 4)
    np.testing.assert_allclose(p.T @ p, np.eye(4), atol=1e-5)


def test_the_best_validation_epoch_is_saved_and_patience_stops_early(encoder, tmp_path):
    tabular_csv(str(tmp_path / "t.csv"), 90, 0)
    cfg = AdaptConfig(encoder=encoder, modality="tabular", data=str(tmp_path / "t.csv"), target="cls",
                      ignore="id,y", out=str(tmp_path / "m"), epochs=40, lr=3e-3, batch_size=16, patience=3)
    s = train_adapter(cfg, NO_TRACKING, progress=False)
    assert s["epochs_run"] < 40 and s["epochs_run"] == s["best_epoch"] + 3  # stopped 3 epochs after the best
    saved = json.loads((tmp_path / "m" / "adapter.json").read_text())["training"]
    assert saved["best_epoch"] == s["best_epoch"] and saved["metrics"] == s["metrics"]
    # the saved model is the best epoch's: it reproduces that epoch's validation accuracy
    from mtx_dist.adapt.data import split
    r = predict(str(tmp_path / "m"), str(tmp_path / "t.csv"))
    _, val_idx = split(90, cfg.val_fraction, cfg.seed)
    truth = [l.split(",")[-1] for l in (tmp_path / "t.csv").read_text().splitlines()[1:]]
    right = sum(r["predictions"][i] == truth[i] for i in val_idx)
    assert right / len(val_idx) == pytest.approx(s["metrics"]["val_accuracy"], abs=1e-6)
