"""Defaults of ``afmkit curate`` and of ``default_steps``: the one source both read."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurationSettings:
    text_key: str = "text"  # JSONL field holding the text
    profile: str = "auto"  # quality rules: auto (by file suffix), prose or code
    near_threshold: float = 0.8  # near-duplicate Jaccard threshold
    shingle: str = "word"  # near-dedup shingles: word or character n-grams
    shingle_size: int = 5  # words (or characters) per shingle
    ngram: int = 13  # decontamination n-gram size in words
    min_ngram: int = 4  # shortest benchmark n-gram used
    common_count: int = 1000  # corpus count that makes an n-gram common (not evidence of contamination)
