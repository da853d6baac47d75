"""Text features of a prompt for the task classifier: hashed n-grams of its head and tail.

Instructions and questions sit at a prompt's start or end, so only the first `head_chars` and
the last `tail_chars` characters are read (the cost does not grow with the prompt). The text
is first normalised (:func:`normalise`: chat-template markup removed, NFKC, lower case, digit
runs as one "0", whitespace collapsed). Each view gives word unigrams and bigrams and
character n-grams of its words (`char_ngrams`, padded with spaces); every gram is hashed
(CRC-32, stable across processes) into one of `n_features` buckets with a sign. A view's
counts are log-scaled and L2-normalised per gram kind, so the result is a sparse vector of
at most 4 unit blocks: (indices int64 [nnz], values float32 [nnz]).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np

# Chat-template markup of common model families (ChatML, Llama 3, Llama 2 / Mistral, Gemma).
_MARKUP = re.compile(r"<\|[^|<>\s]{1,40}\|>|\[/?INST\]|<</?SYS>>|</?s>|<(?:start|end)_of_turn>|<bos>|<eos>")
_DIGITS = re.compile(r"\d+")
_WORD = re.compile(r"\w+")
NORM = True
LOG = True


@dataclass(frozen=True)
class FeatureConfig:
    """How text becomes a feature vector; stored with the weights that were trained on it."""

    n_features: int = 1 << 15  # hash buckets (a power of two)
    head_chars: int = 600  # characters read from the prompt's start
    tail_chars: int = 600  # and from its end
    edge_chars: int = 200  # the first / last this many characters are regions of their own
    char_min: int = 3  # character n-gram lengths, inclusive
    char_max: int = 5

    def __post_init__(self) -> None:
        if self.n_features < 2 or self.n_features & (self.n_features - 1):
            raise ValueError(f"n_features must be a power of two >= 2, got {self.n_features}")
        if self.head_chars < 0 or self.tail_chars < 0 or self.head_chars + self.tail_chars == 0:
            raise ValueError("head_chars and tail_chars must be >= 0, and not both 0")
        if not 1 <= self.char_min <= self.char_max:
            raise ValueError(f"need 1 <= char_min <= char_max, got {self.char_min}, {self.char_max}")

    def as_array(self) -> np.ndarray:
        return np.array(
            [self.n_features, self.head_chars, self.tail_chars, self.edge_chars, self.char_min, self.char_max],
            dtype=np.int64,
        )

    @staticmethod
    def from_array(values: np.ndarray) -> FeatureConfig:
        return FeatureConfig(*(int(v) for v in values))


def normalise(text: str) -> str:
    """`text` without chat markup, NFKC, lower case, digit runs as "0", single spaces."""
    text = unicodedata.normalize("NFKC", _MARKUP.sub(" ", text)).lower()
    return " ".join(_DIGITS.sub("0", text).split())


def views(text: str, config: FeatureConfig) -> tuple[str, str, str, str]:
    """The normalised regions of `text`: its first `edge_chars`, the rest of its first
    `head_chars`, its last `edge_chars`, the rest of its last `tail_chars` (they overlap when
    the text is short)."""
    head = normalise(text[: 4 * config.head_chars])[: config.head_chars]  # normalising shrinks: read more
    tail = normalise(text[-4 * config.tail_chars :]) if config.tail_chars else ""
    tail = tail[max(0, len(tail) - config.tail_chars) :]
    edge = config.edge_chars
    return head[:edge], head[edge:], tail[max(0, len(tail) - edge) :], tail[: max(0, len(tail) - edge)]


def _grams(view: str, config: FeatureConfig) -> tuple[list[str], list[str]]:
    words = _WORD.findall(view)
    word_grams = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    char_grams = []
    for word in words:
        padded = f" {word} "
        for n in range(config.char_min, config.char_max + 1):
            char_grams.extend(padded[i : i + n] for i in range(len(padded) - n + 1))
    return word_grams, char_grams


def featurise(text: str, config: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """The sparse feature vector of `text`: (indices int64 [nnz], values float32 [nnz]),
    indices unique and sorted; empty for text with no word characters."""
    mask = config.n_features - 1
    buckets: dict[int, float] = {}
    for region, view in zip(("h", "H", "t", "T"), views(text, config), strict=True):
        if not view:
            continue
        for kind, grams in zip(("w", "c"), _grams(view, config), strict=True):
            counts: dict[int, float] = {}
            for gram in grams:
                h = zlib.crc32(f"{region}{kind}:{gram}".encode())
                index, sign = h & mask, 1.0 if h >> 31 else -1.0
                counts[index] = counts.get(index, 0.0) + sign
            if not counts:
                continue
            values = np.sign(list(counts.values())) * (np.log1p(np.abs(list(counts.values()))) if LOG else 1.0)
            norm = (float(np.linalg.norm(values)) or 1.0) if NORM else 1.0
            for index, value in zip(counts, values, strict=True):
                buckets[index] = buckets.get(index, 0.0) + float(value) / norm
    indices = np.array(sorted(buckets), dtype=np.int64)
    return indices, np.array([buckets[i] for i in indices.tolist()], dtype=np.float32)
