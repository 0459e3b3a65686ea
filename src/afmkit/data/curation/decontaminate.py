"""N-gram decontamination against evaluation sets, with AFM's rule (spec section 4):

a training document is dropped when it shares an n-gram with a benchmark example, unless that
n-gram is *common*: it occurs ``common_count`` (1,000) times or more in the training corpus.

N-gram policy (our reading of "4- to 13-gram"): words are lower-cased runs of letters, digits and
underscores (punctuation and spacing ignored). Each benchmark example contributes its n-grams
with n = ``ngram`` (13 by default); an example shorter than that contributes its whole text as one
n-gram of its own length, if it has at least ``min_ngram`` (4) words; shorter examples are
ignored. So n is 13 for all but the shortest examples and never below 4.

Efficiency: n-grams are 64-bit hashes (see ``hashing``), the benchmark's are a sorted array per n,
and a document's n-grams are looked up by one vectorised binary search. The counting pass (``prepare``)
counts only n-grams that collide with a benchmark, so its memory is bounded by the benchmark.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afmkit.data.corpus import Document, iter_jsonl_rows
from afmkit.data.curation.hashing import ngram_hashes, word_hashes, words
from afmkit.data.curation.pipeline import Removed
from afmkit.errors import UserError
from afmkit.files import packaged_data

# Built-in evaluation sets: a file shipped with afmkit (see afmkit/resources) and its text field.
BUILTIN_EVAL_SETS = {"ifeval": ("ifeval/input_data.jsonl", "prompt")}
EXAMPLE_FIELDS = ("prompt", "text", "question", "instruction", "input")


@dataclass(frozen=True)
class EvalExample:
    name: str  # "ifeval:1000" or "path:line"
    text: str


def load_eval_set(spec: str | os.PathLike) -> list[EvalExample]:
    """Examples of a built-in evaluation set by name (``ifeval``) or from a file.

    A JSONL file gives one example per row (its first string field among prompt, text, question,
    instruction, input); any other file gives one example per non-blank line.
    """
    spec = str(spec)
    if spec in BUILTIN_EVAL_SETS:
        relative, key = BUILTIN_EVAL_SETS[spec]
        path = packaged_data(relative)  # ships with afmkit
        return [
            EvalExample(f"{spec}:{row.get('key', line)}", row[key]) for line, row in _jsonl_rows(path) if row.get(key)
        ]
    path = Path(spec)
    if not path.is_file():
        known = ", ".join(BUILTIN_EVAL_SETS)
        raise UserError(f"--decontaminate {spec}: no such file and not a built-in evaluation set ({known})")
    if path.suffix in (".jsonl", ".ndjson"):
        examples = []
        for line, row in _jsonl_rows(path):
            text = next((row[k] for k in EXAMPLE_FIELDS if isinstance(row.get(k), str)), None)
            if text is None:
                raise UserError(f"{path}:{line}: no text field; expected one of {', '.join(EXAMPLE_FIELDS)}")
            examples.append(EvalExample(f"{path}:{line}", text))
    else:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        examples = [EvalExample(f"{path}:{i}", t) for i, t in enumerate(lines, 1) if t.strip()]
    if not examples:
        raise UserError(f"the evaluation set {path} has no examples")
    return examples


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict]]:
    return ((line, row) for line, row in iter_jsonl_rows(path) if isinstance(row, dict))


class Decontaminator:
    """Drop documents that share a rare n-gram with an evaluation example."""

    name = "decontaminate"

    def __init__(
        self, examples: Sequence[EvalExample], *, ngram: int = 13, min_ngram: int = 4, common_count: int = 1000
    ) -> None:
        if not 1 <= min_ngram <= ngram:
            raise UserError(f"need 1 <= min_ngram <= ngram, got min_ngram={min_ngram}, ngram={ngram}")
        self.ngram, self.min_ngram, self.common_count = ngram, min_ngram, common_count
        by_size: dict[int, dict[int, str]] = {}
        for example in examples:
            tokens = words(example.text)
            n = min(ngram, len(tokens))
            if n < min_ngram:
                continue
            table = by_size.setdefault(n, {})
            for h in ngram_hashes(word_hashes(tokens), n).tolist():
                table.setdefault(h, example.name)
        if not by_size:
            raise UserError(f"no evaluation example has {min_ngram} or more words; nothing to decontaminate against")
        self._owner = by_size  # n -> {n-gram hash: first example holding it}
        self._sorted = {n: np.array(sorted(table), dtype=np.uint64) for n, table in by_size.items()}
        self.corpus_counts: Counter[int] = Counter()
        self.benchmark_ngrams = sum(len(t) for t in by_size.values())

    def _collisions(self, text: str) -> list[tuple[int, int, int]]:
        """(n, position, hash) of each document n-gram that is also a benchmark n-gram."""
        tokens = words(text)
        hashes = word_hashes(tokens)
        found = []
        for n, table in self._sorted.items():
            grams = ngram_hashes(hashes, n)
            if len(grams):
                # Binary search in the sorted benchmark table: O(len(grams) log len(table)), no re-sorting.
                index = np.minimum(np.searchsorted(table, grams), len(table) - 1)
                for pos in np.flatnonzero(table[index] == grams).tolist():
                    found.append((n, pos, int(grams[pos])))
        return found

    def prepare(self, documents: Iterable[Document]) -> None:
        """Count, over the training corpus, how often each benchmark n-gram occurs."""
        for document in documents:
            self.corpus_counts.update(h for _, _, h in self._collisions(document.text))

    def process(self, document: Document) -> Document | Removed:
        for n, pos, h in self._collisions(document.text):
            if self.corpus_counts[h] < self.common_count:
                phrase = " ".join(words(document.text)[pos : pos + n])
                return Removed(
                    f"{n}-gram shared with {self._owner[n][h]} ({self.corpus_counts[h]} in corpus): {phrase!r}"
                )
        return document


def decontaminator_for(
    specs: Sequence[str], *, ngram: int = 13, min_ngram: int = 4, common_count: int = 1000
) -> Decontaminator:
    examples = [example for spec in specs for example in load_eval_set(spec)]
    return Decontaminator(examples, ngram=ngram, min_ngram=min_ngram, common_count=common_count)
