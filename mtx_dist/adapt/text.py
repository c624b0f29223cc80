"""Text classification/regression on the frozen encoder: a ``.csv``/``.parquet`` table with a text
column (``--text-column``, default ``text``) and the ``--target`` column.

Captions are CLIP BPE tokens (the training tokenizer, ``--context-length`` tokens with SOT/EOT,
zero padded). The tokenizer is a learned token embedding over the CLIP vocabulary plus learned
positions and a [CLS] token. The embedding starts from the pretrained text tower's token embedding
when the encoder folder carries one and ``--tokenizer-init`` allows it (:mod:`mtx_dist.adapt.pretrained`);
a text tower narrower or wider than the encoder gets a learned projection to the encoder's width.
Otherwise it starts random.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mtx_dist.adapt.data import DataError, is_missing, read_rows
from mtx_dist.adapt.pretrained import init_text_tower, text_tower_settings
from mtx_dist.models.presets import CLIP_VOCAB_SIZE as VOCAB


class TextIO:
    @staticmethod
    def read(path, cfg, labelled, pre=None):
        columns, rows, _, raw = read_rows(path, cfg.target, labelled)
        column = pre["column"] if pre else cfg.text_column
        if column not in columns:
            raise DataError(f"{path}: no text column {column!r} (--text-column); columns are: {', '.join(columns)}")
        texts = []
        for i, row in enumerate(rows):
            v = row[column]
            if is_missing(v) or not str(v).strip():
                raise DataError(f"{path}: row {raw.ids[i]}, column {column!r} is empty")
            texts.append(str(v))
        raw.items = texts
        raw.info.update(text_column=column)
        return raw

    @staticmethod
    def fit(raw, train_idx, cfg, manifest) -> tuple[dict, dict]:
        from mtx_data_pipelines.tokenizer import ClipTokenizer

        ids = ClipTokenizer(context_length=cfg.context_length)([raw.items[i] for i in train_idx])
        truncated = int((ids[:, -1] != 0).sum())  # rows that filled the context (their tail was cut)
        raw.info.update(texts_filling_the_context=truncated)
        settings = {"context_length": cfg.context_length, **text_tower_settings(cfg, VOCAB)}
        return {"column": raw.info["text_column"]}, settings

    initialise = staticmethod(init_text_tower)  # the pretrained token embedding, when fit chose it

    @staticmethod
    def transform(raw, pre, settings) -> torch.Tensor:
        from mtx_data_pipelines.tokenizer import ClipTokenizer

        ids = ClipTokenizer(context_length=settings["context_length"])(raw.items)
        return torch.from_numpy(np.ascontiguousarray(ids))


class TextTokenizer(nn.Module):
    """(N, context) CLIP token ids -> [CLS] + context token embeddings with learned positions.

    ``text_width``: the token embedding's width when it differs from the encoder's (a pretrained text
    tower's); a learned linear projection then maps it to the encoder's width. ``init`` records where
    the embedding started (``random`` or ``text_tower``); the weights themselves are copied in by
    :func:`mtx_dist.adapt.pretrained.init_text_tower` when training starts, and come from the adapter file after that.
    """

    def __init__(self, width: int, context_length: int, vocab_size: int = VOCAB, text_width: int = 0,
                 init: str = "random") -> None:
        super().__init__()
        dim = text_width or width
        self.init = init
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.proj = nn.Linear(dim, width) if dim != width else None
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(context_length + 1, width) * 0.01)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids.long())
        if self.proj is not None:
            x = self.proj(x)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return self.norm(torch.cat([cls, x], dim=1) + self.pos_embed)
