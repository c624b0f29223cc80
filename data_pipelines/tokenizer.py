"""CLIP byte-level BPE tokenizer producing the same ids as OpenCLIP's ``tokenize``.

The merges are data belonging to the CLIP project; we read the copy shipped inside the
``open_clip_torch`` distribution (located without importing open_clip, whose import needs
torchvision). Nothing is fetched from the network.

Written here rather than taken from open_clip because importing open_clip pulls in torchvision,
which the runtime must not need.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file
SOT, EOT = "<start_of_text>", "<end_of_text>"
TEXT_PAD_MULTIPLE = 8  # trimmed batches are padded to a multiple of this (few distinct shapes)

# Contractions, runs of letters, single digits, runs of other non-space symbols.
_PATTERN = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def default_vocab_path() -> str:
    spec = importlib.util.find_spec("open_clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, VOCAB_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"CLIP BPE vocabulary {VOCAB_FILE} not found: install the 'open_clip_torch' package "
        "(a dependency of mtx-dist), or pass vocab_path= explicitly"
    )


def _byte_alphabet() -> dict[int, str]:
    """Reversible byte -> printable unicode character map (GPT-2/CLIP byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clean(text: str) -> str:
    # ftfy and HTML unescaping leave printable ASCII without "&" as it is (no mojibake, control
    # characters, line breaks, terminal escapes or entities to fix; tested against ftfy): most captions
    # skip ftfy's passes (half of encoding a short caption)
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """``tokenizer(["a photo"])`` -> int64 array (batch, context_length), zero padded."""

    def __init__(self, vocab_path: str | None = None, context_length: int = 77) -> None:
        self.context_length = context_length
        with gzip.open(vocab_path or default_vocab_path(), "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1 : NUM_MERGES + 1]]
        self.byte_map = _byte_alphabet()
        symbols = list(self.byte_map.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_uncached)  # captions repeat words

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[tok] for tok in self._bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        inv = {c: b for b, c in self.byte_map.items()}
        text = "".join(self.decoder[i] for i in ids if i not in (0, self.sot_id, self.eot_id))
        words = (bytes(inv[c] for c in word) for word in text.split("</w>"))
        return b" ".join(words).decode("utf-8", "replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 pad_multiple: int = 0) -> np.ndarray:
        """Token ids, zero padded. ``pad_multiple`` > 0 pads only to the longest row (EOT included) rounded
        up to that multiple, capped at the context length (:func:`trimmed_length`)."""
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        rows = [[self.sot_id, *self.encode(text)][: n - 1] + [self.eot_id] for text in texts]
        width = trimmed_length(max((len(r) for r in rows), default=1), n, pad_multiple) if pad_multiple else n
        out = np.zeros((len(texts), width), dtype=np.int64)
        for row, ids in zip(out, rows):
            row[: len(ids)] = ids
        return out


def trimmed_length(longest: int, context_length: int, multiple: int) -> int:
    """Padded width of a batch whose longest row (EOT included) has ``longest`` tokens: rounded up to
    ``multiple`` (few distinct shapes, so compiled graphs and kernels are reused) and capped at the
    context length. Features are unchanged: the text tower is causal and pools at EOT, so the padding
    after a row's EOT never reaches it."""
    return min(context_length, -(-longest // multiple) * multiple)
