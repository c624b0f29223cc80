"""Held-out image<->text retrieval and zero-shot classification.

The metric functions take features; :func:`evaluate_shards` reads WebDataset shards of
``jpg``/``png``/``webp`` + ``txt`` (caption) [+ ``cls`` (integer label)] in one pass with the eval
transform (shortest-side bicubic resize, center crop, CLIP mean/std) and the CLIP tokenizer.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtx_data_pipelines.transforms import normalize_images
from mtx_dist.errors import UserError
from mtx_dist.prompts import TEMPLATES  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


class EvalDataError(UserError, ValueError):
    """Evaluation data that cannot give the requested metrics (no usable samples, bad class file)."""


def _rank_of_true(scores: torch.Tensor, true_index: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's true candidate: how many others score at least as high (ties count
    against the match, so a collapsed model with identical features scores 0, not 1)."""
    true = scores.gather(1, true_index.unsqueeze(1))
    return (scores >= true).sum(dim=1) - 1


def caption_keys(text: torch.Tensor) -> list[tuple[int, ...]]:
    """Per row of token ids, the ids up to and including end-of-text (found as the text tower finds
    it): two captions with equal keys are the same text to the model (the tokenizer lowercases and
    collapses whitespace), so retrieval counts them as one target."""
    eot = text.argmax(dim=-1).tolist()
    return [tuple(row[:e + 1]) for row, e in zip(text.tolist(), eot)]


def caption_groups(keys: Sequence[Hashable]) -> torch.Tensor:
    """(N,) group ids: items with equal keys (caption texts or :func:`caption_keys`) share one id."""
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


def chance_recall_at_1(groups: torch.Tensor) -> float:
    """Recall@1 of a random ranking when identical captions are one target: the top-1 candidate of an
    item of group g is a hit with probability n_g / N, so the mean is sum(n_g^2) / N^2 (1/N without repeats)."""
    n = groups.numel()
    return float((torch.bincount(groups).double() ** 2).sum() / n ** 2)


def retrieval_counts(groups: torch.Tensor) -> dict[str, float]:
    """What a retrieval score is read against: distinct captions and the chance recall@1."""
    return {"distinct_captions": float(groups.unique().numel()), "chance_recall_at_1": chance_recall_at_1(groups)}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), groups: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@K of image->text and text->image, pair i being the match of item i (K <= N only).

    ``groups`` (:func:`caption_groups`): items with the same id have the same caption, and any of them
    is a match: image->text hits when a retrieved caption's text is the image's, text->image when a
    retrieved image has that caption. The rank is the number of non-matches scoring at least as high as
    the best match (ties count against it). Without repeats this is the plain pairwise recall."""
    sim = image_features.float() @ text_features.float().t()
    n = sim.shape[0]
    groups = torch.arange(n) if groups is None else groups.to(torch.long).cpu()
    same = groups.unsqueeze(1) == groups.unsqueeze(0)  # symmetric: serves both directions
    out = {}
    for name, scores in (("i2t", sim), ("t2i", sim.t())):
        best = scores.masked_fill(~same, -float("inf")).amax(dim=1, keepdim=True)
        rank = ((scores >= best) & ~same).sum(dim=1)
        for k in ks:
            if k <= n:
                out[f"{name}_recall_at_{k}"] = (rank < k).double().mean().item()
    return out


def zero_shot_accuracy(image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor,
                       ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-K accuracy of classifying each image as its most similar class embedding (K <= classes);
    a class tied with the true one counts against it."""
    scores = image_features.float() @ class_features.float().t()
    rank = _rank_of_true(scores, labels.long())
    return {f"zeroshot_top{k}": (rank < k).double().mean().item() for k in ks if k <= class_features.shape[0]}


def class_embeddings(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenize: Callable[[list[str]], torch.Tensor],
                     classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(classes, dim): per class, the mean of the L2-normalized embeddings of its prompts, renormalized."""
    out = []
    for name in classnames:
        feats = F.normalize(encode_text(tokenize([t.format(name) for t in templates])).float(), dim=-1)
        out.append(F.normalize(feats.mean(dim=0), dim=-1))
    return torch.stack(out)


def read_classnames(path: str) -> list[str]:
    """One class name per line (label i = line i); blank lines are not allowed in between."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f.read().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise EvalDataError(f"--classes {path}: cannot read it: {e}") from e
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise EvalDataError(f"--classes {path}: no class names (one per line expected)")
    blank = [i + 1 for i, ln in enumerate(lines) if not ln]
    if blank:
        raise EvalDataError(f"--classes {path}: blank line(s) {blank[:5]}: label i is line i, so none may be empty")
    return lines


# -- reading shards -------------------------------------------------------------------------------

def iter_samples(shards: str, image_size: int, skipped: Counter, max_pixels: int | None = None) -> Iterator[dict]:
    """One pass over the shards, read like training reads them (local paths, ``pipe:``, fsspec URLs)
    and parsed by the same rules (``mtx_data_pipelines.records``): {"key", "image" (3,H,W uint8),
    "caption" or None, "label" or None}. Samples that cannot be used are skipped and counted in
    ``skipped`` by reason."""
    from mtx_data_pipelines.records import Unusable, parse_sample
    from mtx_data_pipelines.sources import list_shards, read_shard
    from mtx_data_pipelines.transforms import DEFAULT_MAX_PIXELS, decode_rgb, eval_transform

    def broken(url: str, exn: Exception) -> None:
        skipped["tar_error"] += 1
        log.warning("shard %s is unreadable (%s); skipping the rest of it", url, exn)

    for url in list_shards(shards):
        for sample in read_shard(url, broken):
            try:
                record = parse_sample(sample, caption_required=False)
                image = eval_transform(decode_rgb(record.image, max_pixels or DEFAULT_MAX_PIXELS), image_size,
                                       normalize=False)
            except Unusable as e:
                skipped[e.reason] += 1
                continue
            yield {"key": record.key, "image": torch.from_numpy(image), "caption": record.caption,
                   "label": record.label}


@torch.no_grad()
def evaluate_shards(model: nn.Module, shards: str, tokenize: Callable[[list[str]], torch.Tensor],
                    classnames: Sequence[str] | None = None, templates: Sequence[str] = TEMPLATES["openai"],
                    batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, float]:
    """Retrieval over the samples with captions, zero-shot accuracy over those with labels (when
    ``classnames`` are given). ``model`` has ``encode_image``/``encode_text`` returning normalized
    features. Returns the metrics with counts (``n_retrieval``, ``n_zeroshot``, ``skipped_<reason>``)."""
    spec = model.spec
    skipped: Counter = Counter()
    images, captions, labels, pending = [], [], [], []

    def flush() -> None:
        batch = normalize_images(torch.stack([s["image"] for s in pending]).to(device))
        feats = model.encode_image(batch).float().cpu()
        for s, f in zip(pending, feats):
            images.append(f)
            captions.append(s["caption"])
            labels.append(s["label"])
        pending.clear()

    for sample in iter_samples(shards, spec.vision.image_size, skipped):
        if sample["label"] is not None and classnames is not None and not 0 <= sample["label"] < len(classnames):
            skipped["label_out_of_range"] += 1
            sample["label"] = None
            if sample["caption"] is None:
                continue
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    metrics: dict[str, float] = {f"skipped_{k}": float(v) for k, v in sorted(skipped.items())}

    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.encode_text(tokens[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(tokens), batch_size)])

    with_caption = [i for i, c in enumerate(captions) if c is not None]
    if with_caption:
        img = torch.stack([images[i] for i in with_caption])
        tokens = tokenize([captions[i] for i in with_caption])
        groups = caption_groups(caption_keys(tokens))
        metrics.update(retrieval_metrics(img, encode_text(tokens), groups=groups))
        metrics.update(retrieval_counts(groups))
    metrics["n_retrieval"] = float(len(with_caption))
    if classnames is not None:
        with_label = [i for i, lab in enumerate(labels) if lab is not None]
        if not with_label:
            raise EvalDataError(f"--classes given, but no sample in {shards!r} has a usable .cls label "
                                f"(0..{len(classnames) - 1}); shards made from a table get labels with "
                                f"`mtx-dist shards --label-column COLUMN`")
        classes = class_embeddings(encode_text, tokenize, classnames, templates)
        metrics.update(zero_shot_accuracy(torch.stack([images[i] for i in with_label]), classes,
                                          torch.tensor([labels[i] for i in with_label])))
        metrics["n_zeroshot"] = float(len(with_label))
    elif not with_caption:
        raise EvalDataError(f"no sample in {shards!r} has a caption (.txt); for zero-shot classification pass "
                            f"--classes")
    return metrics


@torch.no_grad()
def embed_split(model: nn.Module, loader, device: torch.device, dtype: torch.dtype,
                group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized image and text features of every sample this rank reads, and the caption group of
    each (:func:`caption_groups`), gathered over ``group`` (the data-parallel group: tensor-parallel
    peers read the same samples)."""
    images, texts, keys = [], [], []
    for batch in loader:
        image = batch["image"].to(device, dtype, non_blocking=True)
        text = batch["text"].to(device, non_blocking=True)
        img, txt, *_ = model(image, text)
        images.append(img.float().cpu()), texts.append(txt.float().cpu())
        keys.extend(caption_keys(batch["text"]))
    local = (torch.cat(images), torch.cat(texts), keys)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
    else:
        gathered = [local]
    return (torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]),
            caption_groups([k for g in gathered for k in g[2]]))
