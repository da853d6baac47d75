"""Text features of a prompt for the task classifier: hashed n-grams of its head and tail.

Instructions and questions sit at a prompt's start or end, so only the first `head_chars` and
the last `tail_chars` characters are read (the cost does not grow with the prompt). The text
is first normalised (:func:`normalise`: chat-template markup removed, NFKC, lower case, digit
runs as one "0", whitespace collapsed) and cut into four regions: the first and last
`edge_chars` characters, where the instruction usually is, and the rest of the head and of the
tail. Each region gives its content words (STOPWORDS dropped), its word bigrams (unless both
words are stop words) and the character n-grams of its content words (padded with spaces);
every distinct gram is hashed with its region (CRC-32, stable across processes) into one of
`n_features` buckets with a sign: a sparse vector (indices int64 [nnz], values float32 [nnz]).
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
# Function words: as unigrams (and as bigrams of two of them) they are in every document and
# carry no task; question words and quantifiers ("what", "how", "many", "all", "most") stay.
STOPWORDS = frozenset(
    "a an the of in on at to for from by with about into over under and or but nor so if then than as is are "
    "was were be been being am do does did has have had it its this that these those there here i you he she "
    "we they me him her us them my your his our their not no yes 0 s".split()
)
ROLES = frozenset("system user assistant human model".split())  # chat turns' names, left by the markup


@dataclass(frozen=True)
class FeatureConfig:
    """How text becomes a feature vector; stored with the weights that were trained on it."""

    n_features: int = 1 << 15  # hash buckets (a power of two)
    head_chars: int = 300  # characters read from the prompt's start
    tail_chars: int = 300  # and from its end
    edge_chars: int = 150  # the first / last this many characters are regions of their own
    char_min: int = 4  # character n-gram lengths, inclusive
    char_max: int = 5  # 0: no character n-grams

    def __post_init__(self) -> None:
        if self.n_features < 2 or self.n_features & (self.n_features - 1):
            raise ValueError(f"n_features must be a power of two >= 2, got {self.n_features}")
        if self.head_chars < 0 or self.tail_chars < 0 or self.head_chars + self.tail_chars == 0:
            raise ValueError("head_chars and tail_chars must be >= 0, and not both 0")
        if self.edge_chars < 0:
            raise ValueError(f"edge_chars must be >= 0, got {self.edge_chars}")
        if self.char_max and not 1 <= self.char_min <= self.char_max:
            raise ValueError(f"need 1 <= char_min <= char_max (or char_max 0), got {self.char_min}, {self.char_max}")

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
    content = [w for w in words if w not in STOPWORDS]
    pairs = [f"{a} {b}" for a, b in zip(words, words[1:], strict=False) if a not in STOPWORDS or b not in STOPWORDS]
    word_grams = content + pairs
    char_grams = []
    for word in content:
        padded = f" {word} "
        for n in range(config.char_min, config.char_max + 1):
            char_grams.extend(padded[i : i + n] for i in range(len(padded) - n + 1))
    return word_grams, char_grams


def featurise(text: str, config: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """The sparse feature vector of `text`: (indices int64 [nnz], values float32 [nnz]),
    indices unique and sorted; empty for text with no content word (only stop words, chat
    markup and role names). Each distinct gram of a region adds its sign (+1 or -1) to its
    bucket."""
    regions = views(text, config)
    if not any(w not in STOPWORDS and w not in ROLES for view in regions for w in _WORD.findall(view)):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    mask = config.n_features - 1
    buckets: dict[int, float] = {}
    for region, view in zip(("h", "H", "t", "T"), regions, strict=True):
        for kind, grams in zip(("w", "c"), _grams(view, config), strict=True):
            for gram in set(grams):
                h = zlib.crc32(f"{region}{kind}:{gram}".encode())
                buckets[h & mask] = buckets.get(h & mask, 0.0) + (1.0 if h >> 31 else -1.0)
    indices = np.array(sorted(buckets), dtype=np.int64)
    return indices, np.array([buckets[i] for i in indices.tolist()], dtype=np.float32)
