"""NVIDIA DALI backend: the same batches as :class:`mtx_data_pipelines.loader.Loader`, decoded and
augmented by DALI (on the GPU when training on CUDA, on CPU threads otherwise).

Pipeline: ``fn.readers.webdataset`` (index files, made when missing) -> ``fn.decoders.image``
("mixed" on GPU, "cpu" without one) -> ``fn.random_resized_crop`` (scale (0.9, 1), ratio (3/4, 4/3),
bicubic) for training or a bicubic shorter-side resize for evaluation -> ``fn.crop_mirror_normalize``
(center crop, CLIP mean/std, CHW float32). Captions leave the pipeline as padded bytes and are
checked and tokenized here, in batch.

What it handles, and what it does not (DALI 2.4):

* data-parallel split: ``shard_id = rank``, ``num_shards = world``; DALI splits the samples of all
  shards into contiguous ranges and moves each rank to the next range every epoch, so every sample is
  read once per epoch over all ranks. ``epoch`` tags are samples read // this rank's share (nominal
  near a boundary: DALI's shuffle buffer spans epochs).
* samples missing the image or the caption, or having neither (unknown extensions): skipped by the
  reader (``missing_component_behavior="skip"``), counted once per run from the index files.
* unreadable shards (truncated, not a tar): found while indexing, left out whole, counted once per
  run as ``tar_error`` (the cpu backend still reads the samples before a cut).
* empty and non-UTF-8 captions: dropped here and counted per occurrence, as on the cpu backend.
* NOT handled: a corrupt or non-image file under an image extension, and images over
  ``max_pixels``. DALI's decoder has no skip-on-error; the pipeline fails and :class:`DaliDataError`
  says so. Clean such shards with the cpu backend (``data.backend=cpu`` skips and counts them).
* NOT supported: mixing weights, ``resampled`` mode, remote or ``pipe:`` shards (DALI reads local files).
* exact resume: DALI's own checkpointing (``enable_checkpointing``) stores the reader and random
  state; the loader state adds the samples already handed out of the current DALI batch.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from mtx_data_pipelines.loader import LoaderStateError, StreamConfig, stream_identity
from mtx_data_pipelines.records import Unusable, caption_text, missing_part
from mtx_data_pipelines.sources import scheme, split_sources
from mtx_data_pipelines.tokenizer import ClipTokenizer
from mtx_data_pipelines.transforms import CLIP_MEAN, CLIP_STD, TRAIN_RATIO, TRAIN_SCALE

IMAGE_EXT = "jpg"  # DALI's reader and decoder: JPEG members only
DEFAULT_INDEX_DIR = os.path.join(os.path.expanduser("~"), ".cache", "mtx-dist", "dali-index")


class DaliDataError(RuntimeError):
    """Data the DALI backend cannot skip (a corrupt image, an image over the pixel limit)."""


def _index_for(tar: str, index_dir: str) -> str | None:
    """An index file for ``tar``: the one beside it, else one written into ``index_dir`` (named by a
    hash of the path, size and mtime, so a rewritten shard gets a new one). None if unreadable."""
    from mtx_data_pipelines.dali_index import DaliIndexError, index_path_for, write_dali_index

    beside = index_path_for(tar)
    if os.path.exists(beside) and os.path.getmtime(beside) >= os.path.getmtime(tar):
        return beside
    st = os.stat(tar)
    digest = hashlib.sha256(f"{os.path.abspath(tar)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = os.path.join(index_dir, f"{digest}.idx")
    if os.path.exists(cached):
        return cached
    os.makedirs(index_dir, exist_ok=True)
    try:
        return write_dali_index(tar, cached)
    except DaliIndexError:
        return None


def _index_skips(index: str) -> Counter:
    """Samples of one index the reader will skip, by the cpu backend's reason names."""
    skips: Counter = Counter()
    with open(index) as f:
        next(f)
        for line in f:
            reason = missing_part(set(line.split()[0::4]), (IMAGE_EXT,))
            if reason:
                skips[reason] += 1
    return skips


def _center(extent, size: int):
    """Relative crop position giving the anchor ``round((extent - size) / 2)`` with Python's
    half-to-even rounding (the cpu backend's and torchvision's center crop); DALI itself rounds the
    anchor half up, a one-pixel shift for odd margins."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    margin = extent - size
    half = margin // 2
    anchor = half + (margin - 2 * half) * (half - 2 * (half // 2))
    return fn.cast(anchor, dtype=types.FLOAT) / fn.cast(dmath.max(margin, 1), dtype=types.FLOAT)


class DaliLoader:
    """Iterable over batches of one rank (``image``, ``text``, ``key``, ``epoch``, ``skipped``), with
    ``state_dict``/``load_state_dict`` for exact resume. ``device``: "cuda" decodes on the GPU."""

    def __init__(self, cfg: StreamConfig, device: str = "cpu", index_dir: str = "", threads: int | None = None) -> None:
        if cfg.weights:
            raise ValueError("mixing weights (data.train_weights) need the cpu backend")
        if cfg.mode != "epoch":
            raise ValueError(f"data.mode={cfg.mode!r} needs the cpu backend; the dali backend reads in epoch mode")
        (urls,), _ = split_sources(cfg.shards)
        remote = [u for u in urls if scheme(u) != "local"]
        if remote:
            raise ValueError(f"the dali backend reads local shards only; {remote[0]!r} is not (use backend=cpu)")
        import nvidia.dali  # noqa: F401  (fails here, clearly, when the optional extra is missing)

        self.cfg, self.device = cfg, device
        self.threads = threads or max(1, cfg.workers)
        index_dir = index_dir or DEFAULT_INDEX_DIR
        self.paths, self.indices = [], []
        self.startup_skips: Counter = Counter()
        for url in urls:
            path = url.removeprefix("file://")
            index = _index_for(path, index_dir)
            if index is None:
                self.startup_skips["tar_error"] += 1
                continue
            self.paths.append(path)
            self.indices.append(index)
            self.startup_skips.update(_index_skips(index))
        if not self.paths:
            raise ValueError(f"no readable shard in {cfg.shards!r}")
        if cfg.rank != 0:  # counted once per run, by rank 0, as the trainer sums counters over ranks
            self.startup_skips = Counter()
        self.batches, self.skipped = 0, Counter(self.startup_skips)
        self._resume: dict | None = None
        self._state = self._position(None, 0, 0, 0)
        self._identity = stream_identity(cfg)

    # -- pipeline ------------------------------------------------------------------------------
    def _pipeline(self, checkpoint: bytes | None):
        from nvidia.dali import fn, pipeline_def, types

        cfg, gpu = self.cfg, self.device == "cuda"
        size = cfg.image_size

        @pipeline_def(batch_size=cfg.batch_size, num_threads=self.threads, seed=cfg.seed + 7919 * cfg.rank,
                      device_id=torch.cuda.current_device() if gpu else None, enable_checkpointing=True)
        def pipe():
            jpg, txt = fn.readers.webdataset(
                paths=self.paths, index_paths=self.indices, ext=[IMAGE_EXT, "txt"],
                missing_component_behavior="skip", shard_id=cfg.rank, num_shards=cfg.world_size,
                random_shuffle=cfg.train and cfg.shuffle_buffer > 1, initial_fill=max(cfg.shuffle_buffer, 1),
                seed=cfg.seed, name="reader")
            image = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
            if cfg.train:
                image = fn.random_resized_crop(image, size=(size, size), random_area=TRAIN_SCALE,
                                               random_aspect_ratio=TRAIN_RATIO, interp_type=types.INTERP_CUBIC,
                                               antialias=True)
                pos_x = pos_y = 0.5
            else:
                # subpixel_scale=False: scale to the rounded size exactly, as PIL's resize does
                image = fn.resize(image, resize_shorter=size, interp_type=types.INTERP_CUBIC, antialias=True,
                                  subpixel_scale=False)
                shape = image.shape()
                pos_x, pos_y = _center(shape[1], size), _center(shape[0], size)
            image = fn.crop_mirror_normalize(image, crop=(size, size), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                             mean=[m * 255 for m in CLIP_MEAN], std=[s * 255 for s in CLIP_STD],
                                             dtype=types.FLOAT, output_layout="CHW")
            return image, fn.pad(txt, fill_value=0), txt.shape(), fn.get_property(jpg, key="source_info")

        p = pipe(checkpoint=checkpoint) if checkpoint is not None else pipe()
        p.build()
        return p

    def _images(self, tl) -> torch.Tensor:
        if self.device == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = tl.as_tensor()
            out = torch.empty(t.shape(), dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
            return out
        return torch.from_numpy(np.array(tl.as_tensor()))

    # -- iteration -----------------------------------------------------------------------------
    @staticmethod
    def _position(checkpoint: bytes | None, offset: int, raw: int, counted: int) -> dict:
        """Resume point: the DALI checkpoint before some DALI batch, samples of it already handed out,
        samples read before it, and samples whose skips are already counted."""
        return {"checkpoint": base64.b64encode(checkpoint).decode() if checkpoint else None,
                "offset": offset, "raw": raw, "counted": counted}

    def __iter__(self) -> Iterator[dict]:
        start = self._resume or self._position(None, 0, 0, 0)
        self._resume = None
        pipe = self._pipeline(base64.b64decode(start["checkpoint"]) if start["checkpoint"] else None)
        total, n, r = pipe.reader_meta("reader")["epoch_size"], self.cfg.world_size, self.cfg.rank
        mine = total * (r + 1) // n - total * r // n  # DALI's contiguous share of this rank in epoch 0
        share = max(1, total // n)
        tokenizer = functools.partial(ClipTokenizer(context_length=self.cfg.context_length),
                                      pad_multiple=self.cfg.text_pad_multiple)
        raw, offset, counted = start["raw"], start["offset"], start["counted"]
        pending: list[tuple[dict, torch.Tensor, str, str, int]] = []  # (resume point, image, text, key, epoch)
        skips: Counter = Counter()
        while self.cfg.train or raw < mine:  # evaluation: one pass over this rank's share
            before = pipe.checkpoint()
            try:
                images, texts, lengths, infos = pipe.run()
            except RuntimeError as e:
                raise DaliDataError(f"DALI failed to read or decode a sample in {self.cfg.shards!r} ({e}). The dali "
                                    "backend cannot skip corrupt images or images over data.max_pixels; train with "
                                    "data.backend=cpu, which skips and counts them") from e
            images = self._images(images)
            texts, lengths = np.array(texts.as_tensor()), np.array(lengths.as_tensor()).reshape(-1)
            for i in range(len(lengths)):
                here = raw + i
                if i < offset or not self.cfg.train and here >= mine:  # (the last batch wraps around)
                    continue
                try:
                    text = caption_text(bytes(texts[i, : lengths[i]]))
                except Unusable as e:
                    if here >= counted:
                        skips[e.reason] += 1
                    continue
                name = bytes(np.array(infos[i])).decode().rsplit(":", 1)[-1]
                point = self._position(before, i, raw, max(counted, raw + len(lengths)))
                pending.append((point, images[i], text, name.split(".", 1)[0], here // share))
            raw, offset = raw + len(lengths), 0
            counted = max(counted, raw)
            while len(pending) >= self.cfg.batch_size:
                out, pending = pending[: self.cfg.batch_size], pending[self.cfg.batch_size:]
                self.batches += 1
                self.skipped.update(skips)
                nxt = pending[0][0] if pending else self._position(pipe.checkpoint(), 0, raw, counted)
                self._state = {**nxt, "counted": counted}
                batch = {"image": torch.stack([p[1] for p in out]),
                         "text": torch.from_numpy(tokenizer([p[2] for p in out])),
                         "key": [p[3] for p in out], "epoch": [p[4] for p in out], "source": [0] * len(out),
                         "skipped": dict(skips)}
                skips = Counter()
                yield batch
        self.skipped.update(skips)  # evaluation's end (training never gets here)
        if pending:
            self.batches += 1
            yield {"image": torch.stack([p[1] for p in pending]),
                   "text": torch.from_numpy(tokenizer([p[2] for p in pending])),
                   "key": [p[3] for p in pending], "epoch": [0] * len(pending), "source": [0] * len(pending),
                   "skipped": dict(skips)}

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"backend": "dali", "batches": self.batches, "position": dict(self._state),
                "world_size": self.cfg.world_size, "identity": self._identity, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict, every_rank=None) -> None:
        """Exact resume on the saved data-parallel size only (``every_rank``: unused; DALI's reader cannot
        re-deal an epoch over another number of streams, which the trainer refuses first)."""
        if state.get("backend") != "dali":
            raise LoaderStateError("loader state was saved by the cpu backend; resume with data.backend=cpu")
        if state["world_size"] != self.cfg.world_size:
            raise LoaderStateError(f"loader state was saved with {state['world_size']} data-parallel ranks; this run "
                                   f"has {self.cfg.world_size}. Resuming would repeat or skip samples")
        if state["identity"] != self._identity:
            raise LoaderStateError("loader state was saved for different shards, batch size, seed or transforms; "
                                   "exact resume is impossible")
        self._resume = self._state = dict(state["position"])
        self.batches, self.skipped = state["batches"], Counter(state.get("skipped", {}))
