"""Exact and near-duplicate removal; the first document of each duplicate cluster is kept.

Near duplicates are found with MinHash signatures and locality-sensitive hashing (LSH) by banding:

- a document's *shingles* are its word n-grams (default 5 words) or character n-grams;
- its MinHash signature holds, for each of ``num_perm`` hash functions h_i, the minimum of h_i over
  its shingles; two documents agree in one position with probability equal to the Jaccard
  similarity of their shingle sets, so the fraction of agreeing positions estimates it;
- the signature is cut into ``bands`` bands of ``rows`` values; documents sharing any whole band are
  candidates (probability 1 - (1 - s^rows)^bands for similarity s, a steep S-curve); the banding
  is chosen so that pairs at the threshold are candidates 99% of the time, and each candidate is
  then checked by its estimated Jaccard against the threshold.

The hash functions are multiply-shift: h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 with random odd
a_i, applied to 64-bit shingle hashes, all in numpy.
"""

from __future__ import annotations

import hashlib

import numpy as np

from afmkit.data.corpus import Document
from afmkit.data.curation.hashing import char_hashes, ngram_hashes, word_hashes, words
from afmkit.data.curation.pipeline import Removed
from afmkit.errors import UserError


def normalized_text(text: str) -> str:
    """Case and spacing folded, so copies that differ only there count as exact duplicates."""
    return " ".join(text.lower().split())


class ExactDedup:
    """Drop a document whose normalised text hashes the same as an earlier one's."""

    name = "exact_dedup"

    def __init__(self) -> None:
        self._seen: dict[bytes, str] = {}

    def process(self, document: Document) -> Document | Removed:
        key = hashlib.blake2b(normalized_text(document.text).encode("utf-8"), digest_size=16).digest()
        if key in self._seen:
            return Removed(f"exact duplicate of {self._seen[key]}")
        self._seen[key] = document.source
        return document


class MinHasher:
    """MinHash signatures (``num_perm`` uint32 values) over word or character n-gram shingles."""

    def __init__(self, *, num_perm: int = 128, ngram: int = 5, shingle: str = "word", seed: int = 0) -> None:
        if shingle not in ("word", "char"):
            raise UserError(f"shingle must be 'word' or 'char', got {shingle!r}")
        if num_perm < 2 or ngram < 1:
            raise UserError(f"need num_perm >= 2 and ngram >= 1, got {num_perm} and {ngram}")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm
        self.ngram = ngram
        self.shingle = shingle

    def shingles(self, text: str) -> np.ndarray:
        """The distinct 64-bit shingle hashes; a text shorter than one n-gram is a single shingle."""
        items = word_hashes(words(text)) if self.shingle == "word" else char_hashes(normalized_text(text))
        if len(items) == 0:
            return items
        return np.unique(ngram_hashes(items, min(self.ngram, len(items))))

    def signature(self, text: str, *, block: int = 4096) -> np.ndarray:
        shingles = self.shingles(text)
        signature = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        for start in range(0, len(shingles), block):  # blocks bound memory at num_perm x block
            chunk = shingles[start : start + block]
            values = (self.a[:, None] * chunk[None, :] + self.b[:, None]) >> np.uint64(32)
            np.minimum(signature, values.min(axis=1), out=signature)
        return signature.astype(np.uint32)


def candidate_probability(similarity: float, *, bands: int, rows: int) -> float:
    """The chance that two documents with this Jaccard similarity share at least one whole band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def lsh_bands(*, threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm for near-duplicate search at ``threshold``.

    Every candidate is verified against its signature, so a false candidate costs one vector
    comparison while a missed pair is a duplicate left in the corpus: we ask that a pair exactly at
    the threshold becomes a candidate with probability >= ``recall``, and among such settings take
    the one with the fewest false candidates (the area under the S-curve below the threshold).
    """
    below = np.linspace(0.0, threshold, 200)
    best, best_key = (num_perm, 1), (True, float("inf"))
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        at_threshold = candidate_probability(threshold, bands=bands, rows=rows)
        false_area = float(np.mean(candidate_probability(below, bands=bands, rows=rows))) * threshold
        # Settings that reach the recall come first; then fewer false candidates; else higher recall.
        key = (at_threshold < recall, false_area if at_threshold >= recall else -at_threshold)
        if key < best_key:
            best, best_key = (bands, rows), key
    return best


class NearDedup:
    """Drop a document whose estimated Jaccard similarity to an earlier kept one is >= ``threshold``."""

    name = "near_dedup"

    def __init__(
        self, *, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, shingle: str = "word", seed: int = 0
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise UserError(f"the near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.hasher = MinHasher(num_perm=num_perm, ngram=ngram, shingle=shingle, seed=seed)
        self.bands, self.rows = lsh_bands(threshold=threshold, num_perm=num_perm)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._signatures: list[np.ndarray] = []
        self._sources: list[str] = []

    def process(self, document: Document) -> Document | Removed:
        signature = self.hasher.signature(document.text)
        keys = [signature[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {c for band, key in zip(self._buckets, keys) for c in band.get(key, ())}
        for candidate in sorted(candidates):
            similarity = float(np.mean(self._signatures[candidate] == signature))
            if similarity >= self.threshold:
                return Removed(f"near duplicate of {self._sources[candidate]} (estimated Jaccard {similarity:.2f})")
        index = len(self._signatures)
        self._signatures.append(signature)
        self._sources.append(document.source)
        for band, key in zip(self._buckets, keys):
            band.setdefault(key, []).append(index)
        return document
