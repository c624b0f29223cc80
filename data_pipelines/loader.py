"""Streaming WebDataset loader for image-caption pairs with exact, resumable positions.

Stream layout: the data-parallel rank ``r`` runs ``W`` loader workers; worker ``w`` is global
stream ``g = r * W + w`` of ``G = world * W``. Each source (one ``::`` part of the spec when mixing
weights are given, else the whole spec) is split over the ``G`` streams independently:

* ``epoch`` mode: in epoch ``e`` the source's shards are permuted with a seed derived from
  (seed, source, e) and dealt out whole: stream ``g`` reads shards ``g, g + G, ...`` of that order.
  With fewer shards than streams every stream reads all of them, keeping the samples whose index
  is ``g mod G``. Every sample is seen exactly once per epoch over all ranks and workers, whatever
  the shard count; streams whose epochs are longer (one shard more, bigger shards) simply reach
  their next epoch later. (Splitting only the last ``S mod G`` shards per sample would even out
  epoch lengths but make every stream read those shards: up to G times the I/O for them.)
* ``resampled`` mode: in round ``e`` stream ``g`` draws ``ceil(S / G)`` shards with replacement,
  seeded by (seed, source, e, g). Endless; no coordination between streams.

Samples then pass a shuffle buffer seeded by (seed, source, e, g). Training streams are endless
(epoch after epoch, so ranks never run dry at different times); evaluation streams make one pass.
With several weighted sources each worker picks the source of every sample with its own seeded RNG.

Every batch carries its worker's position: the number of source picks and, per source, (epoch,
samples drawn). The :class:`Loader` records the position of the last batch it handed out per worker;
restoring it makes each worker replay its streams to that point without decoding, so a resumed run
sees exactly the batches an uninterrupted one would have seen. Augmentation randomness is seeded per
sample from (seed, source, epoch, stream, index), so skipping needs no RNG replay.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import webdataset as wds

from mtx_data_pipelines.elastic import EpochPlan, plans_from_json, plans_to_json, replan
from mtx_data_pipelines.sources import list_shards, read_shard, split_sources  # noqa: F401  (list_shards re-exported)
from mtx_data_pipelines.tokenizer import ClipTokenizer
from mtx_data_pipelines.records import IMAGE_EXTS, SKIP_REASONS, Unusable, parse_sample  # noqa: F401  (re-exported)
from mtx_data_pipelines.transforms import DEFAULT_MAX_PIXELS, decode_rgb, eval_transform, train_transform

MODES = ("epoch", "resampled")
log = logging.getLogger(__name__)


class LoaderStateError(ValueError):
    """A saved loader state that does not fit the loader it is restored into."""


@dataclass(frozen=True)
class StreamConfig:
    shards: str  # WebDataset spec: brace lists, several sources joined by "::"
    batch_size: int
    image_size: int
    context_length: int = 77
    train: bool = True
    seed: int = 0
    workers: int = 2
    shuffle_buffer: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    rank: int = 0
    world_size: int = 1
    worker_timeout_s: float = 600.0  # a worker silent this long (a hung pipe:, a stuck mount) raises
    weights: str = ""  # mixing weights of the "::" sources, e.g. "0.7,0.3"; "" = one concatenated source
    mode: str = "epoch"  # "epoch" (each sample once per epoch) or "resampled" (shards drawn with replacement)
    jpeg_draft: bool = False  # let libjpeg decode at a reduced scale that still covers the output size
    # False: images leave the workers as uint8 (4x less to pass between processes and to copy to the
    # device) and are normalized later in batch (transforms.normalize_images), e.g. on the GPU
    normalize: bool = True
    # > 0: each batch's text is padded only to its longest caption, rounded up to this multiple
    # (tokenizer.trimmed_length); the samples are the same, so it is not part of the resume identity
    text_pad_multiple: int = 0
    # niceness added to each worker process (0..19): with 19 the training process's threads keep the
    # cores and the workers use what the step leaves idle; workers blocked on I/O are not affected
    worker_nice: int = 0


def stream_identity(cfg: StreamConfig) -> str:
    """What a saved stream position is valid for: the fields that decide which samples come in which
    order and how they are transformed (not how many workers read them, at which priority, or how text is
    padded)."""
    same = {k: v for k, v in asdict(cfg).items()
            if k not in ("workers", "worker_timeout_s", "normalize", "text_pad_multiple", "worker_nice")}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]


def _totals(skips: Counter) -> dict:
    """(epoch, reason) -> n  as  reason -> n."""
    totals: Counter = Counter()
    for (_, reason), n in skips.items():
        totals[reason] += n
    return dict(totals)


def _silent(url: str, exn: Exception) -> None:
    pass


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def start_position(n_sources: int) -> dict:
    return {"mix": 0, "src": [[0, 0] for _ in range(n_sources)]}


class ImageTextStream(torch.utils.data.IterableDataset):
    """Yields collated batches: image (B,3,H,W) float32, text (B,L) int64, key, epoch and source per
    sample, the worker's position and the skips since the previous batch."""

    def __init__(self, cfg: StreamConfig, start: list[dict] | None = None, first_worker: int = 0,
                 sources: tuple[list[list[str]], list[float]] | None = None,
                 plans: list[dict[int, EpochPlan]] | None = None) -> None:
        super().__init__()
        if cfg.mode not in MODES:
            raise ValueError(f"loader mode {cfg.mode!r}: allowed values are {', '.join(MODES)}")
        self.cfg = cfg
        self.sources, self.weights = sources if sources is not None else split_sources(cfg.shards, cfg.weights)
        self.start = start  # per worker position, or None for the beginning
        # DataLoader takes batches from its workers round-robin starting at process 0; a resumed
        # stream must continue with the logical worker whose turn is next, so process i plays
        # logical worker (first_worker + i) mod W.
        self.first_worker = first_worker
        # per source, the epochs an elastic resume re-dealt (mtx_data_pipelines.elastic)
        self.plans = plans if plans is not None else [{} for _ in self.sources]

    # -- raw samples of one source -------------------------------------------------------------
    def order(self, s: int, epoch: int) -> list[int]:
        """The shards (indices in the source's URL list) of an epoch, in reading order: permuted per
        epoch, without those an elastic resume's plan marks done."""
        order = list(range(len(self.sources[s])))
        if self.cfg.train:
            random.Random(_seed(self.cfg.seed, s, epoch)).shuffle(order)
            plan = self.plans[s].get(epoch)
            if plan is not None:
                order = [i for i in order if i not in plan.done]
        return order

    def share_of(self, s: int, epoch: int, g: int, n_streams: int) -> list[int] | None:
        """The shards stream ``g`` of ``n_streams`` reads whole in an epoch; None when there are fewer
        shards than streams (then every stream reads all of them, keeping its share of the samples)."""
        order = self.order(s, epoch)
        return order[g::n_streams] if len(order) >= n_streams else None

    def _read(self, s: int, shard: int, on_error, on_shard_end=None, epoch: int | None = None) -> Iterator[dict]:
        """Samples of one shard, each marked with its shard and member index, without the members an
        elastic resume's plan says were consumed; ``on_shard_end(shard, members)`` once read to its end."""
        plan = self.plans[s].get(epoch) if epoch is not None and self.cfg.train else None
        skip = plan.consumed.get(shard, frozenset()) if plan is not None else frozenset()
        n = 0
        for n, sample in enumerate(read_shard(self.sources[s][shard], on_error), 1):
            if n - 1 not in skip:
                sample["__shard__"], sample["__member__"] = shard, n - 1
                yield sample
        if on_shard_end is not None:
            on_shard_end(shard, n)

    def epoch_samples(self, s: int, epoch: int, g: int, n_streams: int, on_error,
                      on_shard_end=None) -> Iterator[dict]:
        """Raw samples stream ``g`` of ``n_streams`` emits in one epoch (round, when resampled) of source ``s``."""
        cfg, plan = self.cfg, self.plans[s].get(epoch) if self.cfg.train else None

        def read(shards, quiet=lambda j: False):
            return itertools.chain.from_iterable(
                self._read(s, i, _silent if quiet(j) else on_error, on_shard_end, epoch) for j, i in enumerate(shards))

        if cfg.train and cfg.mode == "resampled":
            rng = random.Random(_seed(cfg.seed, s, epoch, g, 1))
            n = len(self.sources[s])
            samples = read([rng.randrange(n) for _ in range(-(-n // n_streams))])
        else:
            share = self.share_of(s, epoch, g, n_streams)
            if share is not None:  # whole shards dealt out: streams differ by one shard at most
                samples = read(share)
            else:  # fewer shards than streams: every stream reads all, keeping every n-th sample from the
                # g-th; a broken shard is reported by one stream only, so it counts once
                everything = read(self.order(s, epoch), quiet=lambda j: j % n_streams != g)
                samples = itertools.islice(everything, g, None, n_streams)
        if cfg.train and cfg.shuffle_buffer > 1:
            # an elastic resume's plan epoch shuffles with seeds of its own (its streams are new)
            extra = () if plan is None else (plan.generation, 3)
            rng = random.Random(_seed(cfg.seed, s, epoch, g, *extra))
            samples = wds.shuffle(cfg.shuffle_buffer, min(100, cfg.shuffle_buffer), rng=rng)(samples)
        return samples

    def _source(self, s: int, start: tuple[int, int], g: int, n_streams: int,
                on_error: Callable[[int, str, Exception], None]) -> Iterator[tuple[int, int, dict]]:
        """(epoch, index in epoch, sample) of source ``s`` from ``start``, epoch after epoch."""
        first, drawn = start
        replaying = [drawn > 0]

        def report(url: str, exn: Exception) -> None:
            if not replaying[0]:  # counted once, in the run that first met it
                on_error(epoch, url, exn)

        for epoch in itertools.count(first) if self.cfg.train else [first]:
            index = 0
            for sample in self.epoch_samples(s, epoch, g, n_streams, report):
                index += 1
                if index <= drawn:  # fast-forward to the restored position without decoding
                    replaying[0] = index < drawn
                    continue
                yield epoch, index, sample
            if index == 0 and drawn == 0 and self.cfg.train and epoch not in self.plans[s]:
                raise RuntimeError(f"loader stream {g} of {n_streams} found no samples in source {s} "
                                   f"({len(self.sources[s])} shards of {self.cfg.shards!r}): fewer samples than "
                                   "data-parallel ranks x workers, or every shard unreadable")
            drawn = 0

    # -- one sample ----------------------------------------------------------------------------
    def _prepare(self, sample: dict, rng: np.random.Generator | None) -> tuple[np.ndarray, str]:
        record = parse_sample(sample)
        size = self.cfg.image_size
        # A random crop keeps >= 0.9 of the area at an aspect in [3/4, 4/3], so its shorter side is
        # >= ~0.82 of the image's: decoding at >= size / 0.8 never makes the crop upsample.
        draft = (size * 5 // 4 if rng is not None else size) if self.cfg.jpeg_draft else None
        img = decode_rgb(record.image, self.cfg.max_pixels, draft)
        norm = self.cfg.normalize
        return (train_transform(img, size, rng, norm) if rng is not None else eval_transform(img, size, norm)), record.caption

    # -- batches -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w, n_workers = ((info.id + self.first_worker) % info.num_workers, info.num_workers) if info else (0, 1)
        g, n_streams = self.cfg.rank * n_workers + w, self.cfg.world_size * n_workers
        n_src = len(self.sources)
        start = self.start[w] if self.start else start_position(n_src)
        tokenizer = functools.partial(ClipTokenizer(context_length=self.cfg.context_length),
                                      pad_multiple=self.cfg.text_pad_multiple)
        skips: Counter = Counter()  # (epoch, reason) since the last batch; handed out with the next one

        def on_error(epoch: int, url: str, exn: Exception) -> None:  # a shard that broke off: count it, go on
            skips[epoch, "tar_error"] += 1
            log.warning("shard %s is unreadable (%s); skipping the rest of it", url, exn)

        positions = [list(p) for p in start["src"]]
        streams = [self._source(s, tuple(positions[s]), g, n_streams, on_error) for s in range(n_src)]
        picks, mix_rng = start["mix"], random.Random(_seed(self.cfg.seed, g, 2))
        cumulative = list(itertools.accumulate(self.weights))
        for _ in range(picks):  # replay the source picks made before the restored position
            mix_rng.random()

        batch: dict[str, list] = {"image": [], "text": [], "key": [], "epoch": [], "source": []}
        active = list(range(n_src))
        while active:
            if n_src > 1 and self.cfg.train:
                s = min(bisect.bisect_right(cumulative, mix_rng.random() * cumulative[-1]), n_src - 1)
                picks += 1
            else:  # one source, or evaluation: the sources one after the other
                s = active[0]
            try:
                epoch, index, sample = next(streams[s])
            except StopIteration:  # evaluation streams end
                active.remove(s)
                continue
            positions[s] = [epoch, index]
            # = np.random.default_rng(seed list), without its argument dispatch (3 of its 13 us per sample)
            rng = np.random.Generator(np.random.PCG64([self.cfg.seed, s, epoch, g, index])) if self.cfg.train else None
            try:
                image, text = self._prepare(sample, rng)
            except Unusable as e:
                skips[epoch, e.reason] += 1
                continue
            for k, v in (("image", image), ("text", text), ("key", sample["__key__"]), ("epoch", epoch),
                         ("source", s)):
                batch[k].append(v)
            if len(batch["image"]) == self.cfg.batch_size:
                yield self._collate(batch, tokenizer, w, {"mix": picks, "src": [list(p) for p in positions]}, skips)
                batch = {k: [] for k in batch}
                skips.clear()
        if batch["image"]:
            yield self._collate(batch, tokenizer, w, {"mix": picks, "src": positions}, skips)
        elif skips:  # skips after the last sample of a finite stream still reach the counters
            yield {"image": None, "worker": w, "position": {"mix": picks, "src": positions},
                   "skipped": _totals(skips)}

    @staticmethod
    def _collate(batch: dict, tokenizer, worker: int, position: dict, skips: Counter) -> dict:
        return {
            "image": torch.from_numpy(np.stack(batch["image"])),
            "text": torch.from_numpy(tokenizer(batch["text"])),
            "key": batch["key"],
            "epoch": batch["epoch"],
            "source": batch["source"],
            "worker": worker,
            "position": position,
            "skipped": _totals(skips),
            # the same per epoch of the skipped sample: a check of "one epoch" needs the skips of epoch 0
            # that come after its last good sample, handed out with the first batch of epoch 1
            "skipped_by_epoch": [[e, r, n] for (e, r), n in sorted(skips.items())],
        }


def _worker_init(nice: int, outlive_sigterm: bool, worker_id: int) -> None:
    if nice:
        # Loader workers and the training process's compute threads share the cores. An OpenMP thread
        # descheduled in the middle of a parallel region stalls every thread of it at the barrier, so a
        # worker that takes a core from the step costs more than its own CPU time; at a lower priority it
        # runs in the step's idle moments (bench/bench_race.py: ~7 % faster steps on 2 cores, 2026-12-03).
        os.nice(nice)
    _worker_sigterm(outlive_sigterm)


_SIGTERM = {signal.SIGTERM}


def _worker_sigterm(outlive: bool) -> None:
    """Keep a loader worker alive through a job-wide SIGTERM while its trainer handles SIGTERM.

    A cluster that preempts a job sends SIGTERM to every process of it. torch's workers die of it, and
    a dead worker would make a trainer that handles SIGTERM (to checkpoint first) fail before it saves.
    So while the parent has a SIGTERM handler (``outlive``), a worker ends on its parent's SIGTERM
    alone (torch's shutdown of a stuck worker, multiprocessing's exit: a quiet exit, as torch's own
    handler does for its parent) or anyone's once that parent is gone, and ignores the rest. The rule
    reads the sender, which a Python handler cannot see, so SIGTERM stays blocked in every thread of
    the worker (the parent forks it blocked: no window before this runs; the commands of ``pipe:``
    shards start unblocked, sources.py) and one thread takes it with ``sigwaitinfo``. A rule decided
    when the handler runs rather than by whom was a race: a worker at niceness 19 could run the
    handler of the job's SIGTERM only after the trainer had checkpointed and released it, and die."""
    if not outlive:  # the parent has no SIGTERM handler of its own: keep torch's
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGTERM)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGTERM)
    parent = os.getppid()

    def take() -> None:
        # the parent's, or anyone's once the parent is gone (a killed trainer leaves nobody to wait for)
        while signal.sigwaitinfo(_SIGTERM).si_pid != parent and os.getppid() == parent:
            pass
        os._exit(0)

    threading.Thread(target=take, name="sigterm", daemon=True).start()


@contextlib.contextmanager
def _sigterm_blocked():
    """SIGTERM blocked in this thread while it forks loader workers, which inherit the mask; one that
    arrives meanwhile is delivered here when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGTERM)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Loader:
    """Iterable over batches of one rank, with ``state_dict``/``load_state_dict`` for resume."""

    def __init__(self, cfg: StreamConfig, pin_memory: bool = False) -> None:
        # Fails here, in the main process, on a wrong spec, weights or missing local file.
        self.sources, self.weights = split_sources(cfg.shards, cfg.weights)
        if cfg.mode not in MODES:
            raise ValueError(f"loader mode {cfg.mode!r}: allowed values are {', '.join(MODES)}")
        self.cfg, self.pin_memory = cfg, pin_memory
        self.n_workers = max(1, cfg.workers)
        self.positions: list[dict] = [start_position(len(self.sources))] * self.n_workers
        self.batches = 0
        self.skipped: Counter = Counter()
        self.plans: list[dict[int, EpochPlan]] = [{} for _ in self.sources]  # set by an elastic resume
        self._identity = stream_identity(cfg)

    def __iter__(self) -> Iterator[dict]:
        dataset = ImageTextStream(self.cfg, list(self.positions), first_worker=self.batches % self.n_workers,
                                  sources=(self.sources, self.weights), plans=self.plans)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.workers,
            persistent_workers=False, prefetch_factor=4 if self.cfg.workers else None, pin_memory=self.pin_memory,
            timeout=self.cfg.worker_timeout_s if self.cfg.workers else 0,
            worker_init_fn=functools.partial(_worker_init, self.cfg.worker_nice,
                                             callable(signal.getsignal(signal.SIGTERM))),
        )
        with _sigterm_blocked():
            batches = iter(loader)  # forks the workers
        try:
            for batch in batches:
                self.positions[batch["worker"]] = batch["position"]
                self.skipped.update(batch["skipped"])
                if batch["image"] is None:  # only the skip counts of a stream's end
                    continue
                self.batches += 1
                yield batch
        finally:
            del batches

    def state_dict(self) -> dict:
        return {"batches": self.batches, "positions": [json.loads(json.dumps(p)) for p in self.positions],
                "workers": self.n_workers, "world_size": self.cfg.world_size, "identity": self._identity,
                "skipped": dict(self.skipped), "plans": plans_to_json(self.plans)}

    def load_state_dict(self, state: dict, every_rank: Callable[[], list[dict]] | None = None) -> None:
        """Restore a saved position: exactly, on the layout (data-parallel ranks x workers) it was saved
        with; on another one, given ``every_rank`` (the loader states of every rank of the saved run, in
        rank order), the current epoch goes on over the new streams with no sample repeated or lost
        (``mtx_data_pipelines.elastic``)."""
        positions = state["positions"]
        if not all(isinstance(p, dict) and len(p.get("src", ())) == len(self.sources) for p in positions):
            raise LoaderStateError("loader state has an unknown layout (saved by an older version); exact resume "
                                   "is impossible")
        if state["workers"] != self.n_workers or state["world_size"] != self.cfg.world_size:
            if every_rank is None:
                raise LoaderStateError(
                    f"loader state was saved with {state['world_size']} data-parallel ranks x {state['workers']} "
                    f"workers; this run has {self.cfg.world_size} x {self.n_workers}, and the other ranks' states "
                    "were not given: resuming would repeat or skip samples")
            self._elastic(every_rank())
            return
        if state["identity"] != self._identity:
            raise LoaderStateError("loader state was saved for different shards, weights, mode, batch size, seed "
                                   "or transforms; exact resume is impossible")
        self.positions = [{"mix": int(p["mix"]), "src": [[int(e), int(d)] for e, d in p["src"]]} for p in positions]
        self.plans = plans_from_json(state.get("plans"), len(self.sources))
        self.batches = state["batches"]
        self.skipped = Counter(state.get("skipped", {}))

    def _elastic(self, states: list[dict]) -> None:
        """Continue from the states of a run with another layout (see :meth:`load_state_dict`)."""
        world, workers = states[0]["world_size"], states[0]["workers"]
        if len(states) != world or any((st["world_size"], st["workers"]) != (world, workers) for st in states):
            raise LoaderStateError(f"an elastic resume needs the loader states of all {world} data-parallel ranks "
                                   f"of the saved run, each with {workers} workers")
        for r, st in enumerate(states):
            if st["identity"] != stream_identity(dataclasses.replace(self.cfg, rank=r, world_size=world)):
                raise LoaderStateError(f"the loader state of rank {r} was saved for different shards, weights, mode, "
                                       "batch size, seed or transforms")
        n_src = len(self.sources)
        positions = [st["positions"][w] for st in states for w in range(workers)]  # stream g = rank x W + worker
        old_plans = plans_from_json(states[0].get("plans"), n_src)
        if self.cfg.mode == "resampled":  # draws with replacement: the new streams start fresh rounds
            self.plans = [{} for _ in range(n_src)]
            starts = [1 + max(int(p["src"][s][0]) for p in positions) for s in range(n_src)]
        else:
            old = ImageTextStream(self.cfg, sources=(self.sources, self.weights), plans=old_plans)

            def replay(s, epoch, g, n, on_shard_end):
                for sample in old.epoch_samples(s, epoch, g, n, _silent, on_shard_end):
                    yield sample["__shard__"], sample["__member__"]

            self.plans, starts = replan(n_src, world * workers, positions, old_plans, old.share_of, replay)
        self.positions = [{"mix": 0, "src": [[starts[s], 0] for s in range(n_src)]} for _ in range(self.n_workers)]
        self.batches = 0
        # the skip counters are summed over ranks when logged: rank 0 carries the saved run's totals
        self.skipped = sum((Counter(st.get("skipped", {})) for st in states), Counter()) if self.cfg.rank == 0 \
            else Counter()
        log.info("elastic resume: %d ranks x %d workers -> %d x %d; epochs re-dealt per source: %s", world, workers,
                 self.cfg.world_size, self.n_workers, [sorted(p) for p in self.plans])
