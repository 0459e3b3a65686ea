"""Heuristic quality filters in the style of Gopher's rules (Rae et al. 2021) for prose and of
StarCoder's for code. Every threshold is a field of :class:`QualityConfig`.

Two profiles: ``prose`` (Gopher's published thresholds) and ``code`` (source files legitimately
have symbols, short lines and repeated lines such as ``pass`` or ``}``, so the prose rules would
drop them). ``auto`` (the default) picks ``code`` for documents whose source file has a code
suffix (``.py``, ``.js``, ...) and ``prose`` otherwise.

The filters run as three counted steps: ``length`` (word count), ``composition`` (symbols,
alphabetic words, word length, stop words, bullets, ellipses, line length) and ``repetition``
(duplicate lines and paragraphs, most frequent n-grams, duplicated n-grams).
"""

from __future__ import annotations

import abc
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import PurePath

import numpy as np

from afmkit.data.corpus import Document
from afmkit.data.curation.hashing import ngram_hashes, word_hashes
from afmkit.data.curation.pipeline import Removed
from afmkit.errors import UserError

CODE_SUFFIXES = frozenset(
    {".py", ".pyi", ".js", ".ts", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".go", ".rs", ".rb", ".sh", ".jl"}
)
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "▪", "■", "□", "‣", "⁃", "◦", "- ", "* ")
TOKEN = re.compile(r"\S+")
LETTER = re.compile(r"[^\W\d_]")
ALNUM_RUN = re.compile(r"[^\W_]+")
SPACE_RUN = re.compile(r"\s+")


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds; ``None`` turns a rule off. Defaults are Gopher's for prose (see ``for_profile``)."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # ('#' + '...' + '…') per word
    min_alpha_word_fraction: float | None = 0.8  # words holding at least one letter
    min_alnum_char_fraction: float | None = None  # letters+digits over all characters (code)
    min_stop_words: int | None = 2  # distinct English stop words from STOP_WORDS present
    max_bullet_line_fraction: float | None = 0.9  # lines starting with a bullet
    max_ellipsis_line_fraction: float | None = 0.3  # lines ending in '...' or '…'
    max_line_length: int | None = None  # characters (code: minified or data blobs)
    max_mean_line_length: float | None = None
    max_duplicate_line_fraction: float | None = 0.3  # of non-blank lines
    max_duplicate_line_char_fraction: float | None = 0.2
    max_duplicate_paragraph_fraction: float | None = 0.3
    max_duplicate_paragraph_char_fraction: float | None = 0.2
    # Most frequent n-gram's characters over all word characters, for n = 2, 3, 4.
    max_top_ngram_char_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # Characters in n-grams that occur more than once, over all word characters, for n = 5..10.
    max_duplicate_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    @classmethod
    def for_profile(cls, profile: str) -> QualityConfig:
        if profile == "prose":
            return cls()
        if profile == "code":
            # Our choice, after StarCoder's filters (alphanumeric fraction >= 0.25, max line length 1000,
            # mean line length <= 100) and loose repetition limits that normal source files pass.
            return cls(
                min_words=10,
                max_words=200_000,
                min_mean_word_length=None,
                max_mean_word_length=None,
                max_symbol_word_ratio=None,
                min_alpha_word_fraction=None,
                min_alnum_char_fraction=0.25,
                min_stop_words=None,
                max_bullet_line_fraction=None,
                max_ellipsis_line_fraction=None,
                max_line_length=1000,
                max_mean_line_length=100.0,
                max_duplicate_line_fraction=0.5,
                max_duplicate_line_char_fraction=0.4,
                max_duplicate_paragraph_fraction=None,
                max_duplicate_paragraph_char_fraction=None,
                max_top_ngram_char_fraction={},
                max_duplicate_ngram_char_fraction={10: 0.75},
            )
        raise UserError(f"unknown quality profile {profile!r}; use auto, prose or code")

    def replace(self, **changes) -> QualityConfig:
        return dataclasses.replace(self, **changes)


def is_code(document: Document) -> bool:
    path = document.source.rsplit(":", 1)[0] if document.source.rsplit(":", 1)[-1].isdigit() else document.source
    return PurePath(path).suffix.lower() in CODE_SUFFIXES


class _QualityStep(abc.ABC):
    name = ""

    def __init__(self, *, profile: str = "auto", prose: QualityConfig | None = None, code: QualityConfig | None = None):
        if profile not in ("auto", "prose", "code"):
            raise UserError(f"unknown quality profile {profile!r}; use auto, prose or code")
        self.profile = profile
        self.prose = prose or QualityConfig.for_profile("prose")
        self.code = code or QualityConfig.for_profile("code")

    def config_for(self, document: Document) -> QualityConfig:
        if self.profile == "auto":
            return self.code if is_code(document) else self.prose
        return self.code if self.profile == "code" else self.prose

    def process(self, document: Document) -> Document | Removed:
        reason = self.check(document.text, self.config_for(document))
        return Removed(reason) if reason else document

    @abc.abstractmethod
    def check(self, text: str, config: QualityConfig) -> str | None:
        """Why ``text`` fails this step's rule, or None when it passes."""


class LengthFilter(_QualityStep):
    name = "length"

    def check(self, text: str, config: QualityConfig) -> str | None:
        n = len(TOKEN.findall(text))
        if config.min_words is not None and n < config.min_words:
            return f"{n} words < min_words {config.min_words}"
        if config.max_words is not None and n > config.max_words:
            return f"{n} words > max_words {config.max_words}"
        return None


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _above(name: str, value: float, limit: float | None) -> str | None:
    return f"{name} {_number(value)} > {limit}" if limit is not None and value > limit else None


def _below(name: str, value: float, limit: float | None) -> str | None:
    return f"{name} {_number(value)} < {limit}" if limit is not None and value < limit else None


class CompositionFilter(_QualityStep):
    name = "composition"

    def check(self, text: str, config: QualityConfig) -> str | None:
        tokens = TOKEN.findall(text)
        if not tokens:
            return "no words"
        lines = [line for line in text.splitlines() if line.strip()] or [""]
        n = len(tokens)
        mean_word = sum(map(len, tokens)) / n
        symbols = text.count("#") + text.count("...") + text.count("…")
        # Regex runs instead of per-character Python loops: this step sees every character of the corpus.
        alpha_words = sum(1 for t in tokens if LETTER.search(t))
        alnum = sum(map(len, ALNUM_RUN.findall(text)))
        non_space = (len(text) - sum(map(len, SPACE_RUN.findall(text)))) or 1
        stop_words = len(STOP_WORDS.intersection(t.lower().strip(".,;:!?\"'()") for t in tokens))
        bullets = sum(1 for line in lines if line.lstrip().startswith(BULLETS))
        ellipses = sum(1 for line in lines if line.rstrip().endswith(("...", "…")))
        line_lengths = [len(line) for line in lines]
        checks = (
            _below("mean_word_length", mean_word, config.min_mean_word_length),
            _above("mean_word_length", mean_word, config.max_mean_word_length),
            _above("symbol_word_ratio", symbols / n, config.max_symbol_word_ratio),
            _below("alpha_word_fraction", alpha_words / n, config.min_alpha_word_fraction),
            _below("alnum_char_fraction", alnum / non_space, config.min_alnum_char_fraction),
            _below("stop_words", stop_words, config.min_stop_words),
            _above("bullet_line_fraction", bullets / len(lines), config.max_bullet_line_fraction),
            _above("ellipsis_line_fraction", ellipses / len(lines), config.max_ellipsis_line_fraction),
            _above("max_line_length", max(line_lengths), config.max_line_length),
            _above("mean_line_length", sum(line_lengths) / len(lines), config.max_mean_line_length),
        )
        return next((c for c in checks if c), None)


def _duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        seen.add(item)
    return dup_items / len(items), dup_chars / max(sum(map(len, items)), 1)


class RepetitionFilter(_QualityStep):
    name = "repetition"

    def check(self, text: str, config: QualityConfig) -> str | None:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        line_frac, line_chars = _duplicate_fractions(lines)
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        para_frac, para_chars = _duplicate_fractions(paragraphs)
        for check in (
            _above("duplicate_line_fraction", line_frac, config.max_duplicate_line_fraction),
            _above("duplicate_line_char_fraction", line_chars, config.max_duplicate_line_char_fraction),
            _above("duplicate_paragraph_fraction", para_frac, config.max_duplicate_paragraph_fraction),
            _above("duplicate_paragraph_char_fraction", para_chars, config.max_duplicate_paragraph_char_fraction),
        ):
            if check:
                return check
        if not config.max_top_ngram_char_fraction and not config.max_duplicate_ngram_char_fraction:
            return None
        tokens = [t.lower() for t in TOKEN.findall(text)]
        if len(tokens) < 2:
            return None
        hashes = word_hashes(tokens)
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        total = int(lengths.sum())
        for n, limit in sorted(config.max_top_ngram_char_fraction.items()):
            grams = ngram_hashes(hashes, n)
            if len(grams) < 2:
                continue
            _values, first, counts = np.unique(grams, return_index=True, return_counts=True)
            top = int(np.argmax(counts))
            if counts[top] < 2:
                continue
            chars = int(lengths[first[top] : first[top] + n].sum()) * int(counts[top])
            if check := _above(f"top_{n}gram_char_fraction", chars / total, limit):
                return check
        for n, limit in sorted(config.max_duplicate_ngram_char_fraction.items()):
            grams = ngram_hashes(hashes, n)
            if len(grams) < 2:
                continue
            _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
            starts = np.flatnonzero(counts[inverse] > 1)
            # Mark the words each duplicated n-gram covers: +1 at its start, -1 after its end, cumsum.
            cover = np.zeros(len(tokens) + 1, dtype=np.int64)
            np.add.at(cover, starts, 1)
            np.add.at(cover, starts + n, -1)
            covered = np.cumsum(cover)[: len(tokens)] > 0
            if check := _above(f"duplicate_{n}gram_char_fraction", int(lengths[covered].sum()) / total, limit):
                return check
        return None


def quality_steps(
    *, profile: str = "auto", prose: QualityConfig | None = None, code: QualityConfig | None = None
) -> list[_QualityStep]:
    return [cls(profile=profile, prose=prose, code=code) for cls in (LengthFilter, CompositionFilter, RepetitionFilter)]
