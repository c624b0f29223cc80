"""Audio Data2Seq: 16-bit PCM .wav -> log-mel filter bank -> AST-style 2-D patches -> tokens.

No torchaudio (it has no CPU wheel that matches our torch): the STFT is ``torch.stft`` and the mel
filter bank is built here, with the HTK mel scale ``mel = 2595 * log10(1 + f / 700)`` and
triangular filters of peak 1 without area normalisation (what HTK and Kaldi do, and torchaudio's
``melscale_fbanks(norm=None, mel_scale="htk")``). Log-mel values are standardised with the mean and
standard deviation of the training split (AST does the same with dataset statistics).

Patches are non-overlapping ``patch x patch`` squares over (mel, time) -- AST uses a stride of 10
with overlap; non-overlapping keeps the token count (and CPU cost) down and is what ViT itself does.

A file whose sample rate differs from the configured one is refused (:class:`WavFormatError`) rather
than resampled: a silent resampler of lesser quality would change what the model hears; convert with
``sox in.wav -r 16000 out.wav`` or ``ffmpeg -i in.wav -ar 16000 out.wav`` first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
import wave

import numpy as np
import torch
from torch import nn

from mtx_dist.adapt.errors import AdaptError, WavFormatError


def read_wav(path: str, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """-> (mono float32 samples in [-1, 1), rate). Stereo is averaged. ``sample_rate``: the rate required."""
    try:
        with wave.open(path, "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise WavFormatError(f"{path}: not a PCM .wav file this reader accepts ({e})") from e
    if width != 2:
        raise WavFormatError(f"{path}: {8 * width}-bit samples; only 16-bit PCM is supported")
    if channels not in (1, 2):
        raise WavFormatError(f"{path}: {channels} channels; only mono or stereo is supported")
    if sample_rate is not None and rate != sample_rate:
        raise WavFormatError(f"{path}: sample rate {rate} Hz, the model expects {sample_rate} Hz "
                             f"(resample first, e.g. sox {path} -r {sample_rate} out.wav)")
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if len(samples) % channels:
        raise WavFormatError(f"{path}: truncated data ({len(samples)} samples for {channels} channels)")
    return samples.reshape(-1, channels).mean(axis=1), rate


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular HTK-mel filters over the STFT bins, peak 1."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise AdaptError(f"mel range {f_min}..{f_max} Hz must lie within 0..{sample_rate / 2} Hz")
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lo, centre, hi = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lo) / (centre - lo)
    falling = (hi - freqs[:, None]) / (hi - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None)).float()


def log_mel(wave_batch: torch.Tensor, fbank: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(B, samples) -> (B, n_mels, frames) natural-log mel power; frames = 1 + samples // hop."""
    window = torch.hann_window(n_fft, dtype=wave_batch.dtype, device=wave_batch.device)
    spec = torch.stft(wave_batch, n_fft, hop_length=hop, win_length=n_fft, window=window, center=True,
                      pad_mode="constant", return_complex=True)
    power = spec.real ** 2 + spec.imag ** 2
    mel = torch.einsum("fm,bft->bmt", fbank.to(power.dtype), power)
    return torch.log(mel.clamp_min(1e-10))


class AudioTokenizer(nn.Module):
    """Waveforms (B, clip_samples) -> [CLS] + (n_mels/patch) x (frames/patch) patch tokens, + positions."""

    def __init__(self, width: int, sample_rate: int, clip_samples: int, n_fft: int = 400, hop: int = 160,
                 n_mels: int = 128, patch: int = 16, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        frames = 1 + clip_samples // hop
        if n_mels < patch or frames < patch:
            raise AdaptError(f"audio: {n_mels} mel bands x {frames} frames is smaller than one {patch}x{patch} "
                             f"patch (lower --patch, or use longer clips)")
        self.n_fft, self.hop, self.clip_samples = n_fft, hop, clip_samples
        self.mean, self.std = float(mean), float(std)
        self.register_buffer("fbank", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)
        self.patch_embed = nn.Conv2d(1, width, kernel_size=patch, stride=patch)
        n_tokens = (n_mels // patch) * (frames // patch)
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(n_tokens + 1, width) * 0.02)
        self.norm = nn.LayerNorm(width)

    def features(self, wave_batch: torch.Tensor) -> torch.Tensor:
        """Standardised log-mel (B, n_mels, frames)."""
        if wave_batch.shape[-1] != self.clip_samples:
            raise AdaptError(f"audio: clips of {wave_batch.shape[-1]} samples, the tokenizer expects "
                             f"{self.clip_samples}")
        return (log_mel(wave_batch, self.fbank, self.n_fft, self.hop) - self.mean) / self.std

    def forward(self, wave_batch: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.features(wave_batch).unsqueeze(1)).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return self.norm(torch.cat([cls, x], dim=1) + self.pos_embed)


def fit_clip(waves: Iterable[np.ndarray], hop: int) -> int:
    """Clip length for a training set: its longest wave, whole hops (shorter ones are zero-padded)."""
    return max(hop, int(math.ceil(max(len(w) for w in waves) / hop) * hop))


def fixed_length(waves: list[np.ndarray], clip_samples: int) -> tuple[torch.Tensor, int]:
    """Zero-pad or crop every wave to ``clip_samples``; -> (B, clip_samples), number cropped."""
    out = np.zeros((len(waves), clip_samples), dtype=np.float32)
    cropped = 0
    for i, w in enumerate(waves):
        cropped += len(w) > clip_samples
        out[i, : min(len(w), clip_samples)] = w[:clip_samples]
    return torch.from_numpy(out), cropped
