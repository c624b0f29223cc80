"""Video clips: a folder of ``.npy`` arrays ``(T, H, W)`` or ``(T, H, W, 3)`` (uint8, or float in 0..1),
animated ``.gif`` files (decoded with PIL, a core dependency), and ``.mp4``/``.avi``/``.mov``/``.mkv``/
``.webm`` files decoded with PyAV (FFmpeg's bindings: the optional extra ``mtx-dist[video]``; without it
those files are refused with the install hint).

Each clip is sampled to ``--frames`` frames spread evenly over its length, resized (bicubic) to the
encoder's image size and normalised with its preprocessing mean/std. The tokenizer embeds tubelets of
``--tubelet`` frames x patch x patch pixels with one 3-D convolution; learned space-time positions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtx_dist.adapt.errors import AdaptError, DataError
from mtx_dist.adapt.files import as_float_checked, image_geometry, list_samples, load_each, read_npy
from mtx_dist.adapt.pretrained import init_vision_stem, vision_stem_settings

SUFFIXES = (".npy", ".gif", ".mp4", ".avi", ".mov", ".mkv", ".webm")


class VideoIO:
    @staticmethod
    def read(path, cfg, labelled, pre=None):
        from PIL import Image, ImageSequence

        raw = list_samples(path, SUFFIXES, cfg.target, labelled)

        def load(f: str) -> np.ndarray:
            low = f.lower()
            if low.endswith(".npy"):
                a = read_npy(f)
            elif not low.endswith(".gif"):
                a = decode_container(f)
            else:
                try:
                    with Image.open(f) as im:
                        a = np.stack([np.asarray(fr.convert("RGB")) for fr in ImageSequence.Iterator(im)])
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    raise DataError(f"{f}: not a readable clip ({e})") from e
            if a.ndim == 3:
                a = np.repeat(a[..., None], 3, axis=3)
            if a.ndim != 4 or a.shape[3] != 3 or not np.issubdtype(a.dtype, np.number):
                raise DataError(f"{f}: shape {a.shape} {a.dtype}; expected (T, H, W) or (T, H, W, 3) frames")
            if a.shape[0] == 0 or min(a.shape[1:3]) < 1:
                raise DataError(f"{f}: a clip with no frames")
            return as_float_checked(a, f, "frames")

        return load_each(raw, load, cfg)

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        pre, size, patch = image_geometry(cfg, manifest)
        settings = {"frames": cfg.frames, "image_size": size, "patch": patch, "tubelet": cfg.tubelet,
                    **vision_stem_settings(cfg, patch)}
        return pre, settings

    initialise = staticmethod(init_vision_stem)  # the pretrained image stem, inflated over the tubelet

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        size, frames = settings["image_size"], settings["frames"]
        mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
        out = []
        for a in raw.items:
            pick = np.linspace(0, a.shape[0] - 1, frames).round().astype(int)  # evenly over the clip
            x = torch.from_numpy(np.ascontiguousarray(a[pick])).permute(0, 3, 1, 2)  # (F, 3, H, W)
            if x.shape[2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 1)  # resized or not: bicubic overshoot and out-of-range floats alike
            out.append(((x - mean) / std).transpose(0, 1))  # (3, F, S, S)
        return torch.stack(out)


MAX_DECODED_FRAMES = 64  # of a container clip, evenly spaced: what --frames is sampled from


def decode_container(f: str) -> np.ndarray:
    """At most ``MAX_DECODED_FRAMES`` frames, evenly spaced, of the first video stream of ``f`` as
    (T, H, W, 3) uint8, decoded by PyAV. A first pass counts the stream's packets without decoding, so
    a long or large clip never sits in memory whole (a minute of 1080p is ~11 GB of RGB); the frames
    that are not kept are decoded (the codec needs them) and dropped.

    PyAV rather than torchvision.io / imageio: it is FFmpeg's own maintained binding, one wheel with
    FFmpeg inside, and what both of those call underneath.
    """
    try:
        import av
    except ImportError:
        raise DataError(f"{f}: {f.rsplit('.', 1)[-1]} clips need the video decoder: pip install 'mtx-dist[video]' "
                        "(PyAV), or decode them to .npy (T, H, W, 3) arrays first") from None
    try:
        with av.open(f) as container:
            if not container.streams.video:
                raise DataError(f"{f}: a clip with no frames (no video stream)")
            total = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
        keep = set(np.linspace(0, total - 1, min(total, MAX_DECODED_FRAMES)).round().astype(int).tolist())
        frames = []
        with av.open(f) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in keep:
                    frames.append(frame.to_ndarray(format="rgb24"))
        if not frames:
            raise DataError(f"{f}: a clip with no frames")
        return np.stack(frames)
    except av.FFmpegError as e:
        raise DataError(f"{f}: not a readable clip ({e})") from e
    except ValueError as e:  # np.stack: frames of different sizes
        raise DataError(f"{f}: frames of different sizes ({e})") from e


class VideoTokenizer(nn.Module):
    """(N, 3, F, S, S) clips -> [CLS] + (F/t) (S/p)^2 tubelet tokens with space-time positions."""

    def __init__(self, width: int, frames: int, image_size: int, patch: int, tubelet: int, init: str = "random"
                 ) -> None:
        super().__init__()
        self.init = init  # where the weights started (mtx_dist.adapt.pretrained); they come from the file after
        if image_size % patch or frames % tubelet:
            raise AdaptError(f"video: size {image_size} / patch {patch} and frames {frames} / tubelet {tubelet} "
                             "must divide evenly")
        self.shape = (3, frames, image_size, image_size)
        self.embed = nn.Conv3d(3, width, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))
        n = (frames // tubelet) * (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(n + 1, width) * 0.02)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise AdaptError(f"video: input {tuple(x.shape[1:])}, the tokenizer expects {self.shape}")
        x = self.embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return self.norm(torch.cat([cls, x], dim=1) + self.pos_embed)
