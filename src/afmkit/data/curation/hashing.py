"""Fast, deterministic 64-bit hashes of words and n-grams, vectorised with numpy.

Each distinct word is hashed once (BLAKE2b, cached); an n-gram's hash is a polynomial in its words'
hashes (Horner's rule over uint64 arrays, wrapping mod 2^64), so all n-grams of a document come
from ``n`` array operations instead of ``len(document)`` Python-level hashes.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

WORD_PATTERN = re.compile(r"\w+")
# An odd 64-bit multiplier for the n-gram polynomial (odd, so multiplication is invertible mod 2^64).
NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


_WORD_HASHES: dict[str, int] = {}
_MAX_CACHED_WORDS = 1 << 21  # ~200 MB at most; a corpus's vocabulary is usually far smaller


def word_hash(word: str) -> int:
    value = _WORD_HASHES.get(word)
    if value is None:
        if len(_WORD_HASHES) >= _MAX_CACHED_WORDS:
            _WORD_HASHES.clear()
        value = _WORD_HASHES[word] = int.from_bytes(
            hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little"
        )
    return value


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore); punctuation and spacing are ignored."""
    return WORD_PATTERN.findall(text.lower())


def word_hashes(tokens: list[str]) -> np.ndarray:
    cache = _WORD_HASHES
    # Inline dict lookups (the common case) and a call only for unseen words: this runs once per word.
    values = [cache[w] if w in cache else word_hash(w) for w in tokens]
    return np.array(values, dtype=np.uint64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every run of ``n`` consecutive items (``len - n + 1`` of them; none if too short)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = hashes[:count].copy()
    for k in range(1, n):
        out *= NGRAM_MULTIPLIER
        out += hashes[k : k + count]
    return out


def char_hashes(text: str) -> np.ndarray:
    """One well-spread 64-bit value per character (its code point through a multiplicative mix)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    return (codes + np.uint64(0x632BE59BD9B4E019)) * np.uint64(0xBF58476D1CE4E5B9)
