"""The curation pipeline: named steps applied in order, each counted.

A step is a small object with a ``name`` and a ``process(document)`` method that returns either
the (possibly rewritten) document or a :class:`Removed` with the reason. A step that needs to see
the whole corpus first (decontamination counts how common each benchmark n-gram is) also has a
``prepare(documents)`` method; the pipeline calls it with one pass over the raw corpus before the
main pass. Documents stream through: only what the steps keep (hashes, signatures, counts) stays in
memory, never the corpus itself.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from afmkit.data.corpus import Document


@dataclass(frozen=True)
class Removed:
    reason: str


@runtime_checkable
class Step(Protocol):
    name: str

    def process(self, document: Document) -> Document | Removed: ...


@dataclass
class StepStats:
    name: str
    documents_in: int = 0
    documents_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    replacements: dict[str, int] = field(default_factory=dict)  # transforms: what was rewritten, by kind

    @property
    def removed(self) -> int:
        return self.documents_in - self.documents_out


@dataclass
class CurationReport:
    steps: list[StepStats]
    documents_in: int
    documents_out: int
    chars_in: int
    chars_out: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "seconds": round(self.seconds, 3),
            "steps": [{**asdict(s), "removed": s.removed} for s in self.steps],
        }


@dataclass(frozen=True)
class Rejection:
    source: str
    step: str
    reason: str
    preview: str  # the document's first characters, to see what was dropped

    @classmethod
    def of(cls, document: Document, step: str, reason: str) -> Rejection:
        return cls(source=document.source, step=step, reason=reason, preview=document.text[:200])


class Pipeline:
    """Apply ``steps`` in order to a stream of documents, counting what each one does."""

    def __init__(self, steps: Sequence[Step]) -> None:
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique, got {names}")
        self.steps = list(steps)
        self.stats = [StepStats(s.name) for s in steps]
        self.documents_in = self.documents_out = self.chars_in = self.chars_out = 0
        self._start = time.perf_counter()

    @property
    def needs_prepass(self) -> bool:
        return any(hasattr(s, "prepare") for s in self.steps)

    def prepare(self, corpus: Callable[[], Iterable[Document]]) -> int:
        """One pass over the raw corpus per step that needs corpus-wide counts; returns the corpus size.

        ``corpus`` makes a fresh iterator each call, so the corpus is re-read rather than held.
        """
        count = 0
        for step in self.steps:
            if hasattr(step, "prepare"):
                count = 0

                def counted() -> Iterator[Document]:
                    nonlocal count
                    for document in corpus():
                        count += 1
                        yield document

                step.prepare(counted())
        return count

    def run(
        self, documents: Iterable[Document], *, on_reject: Callable[[Rejection], None] | None = None
    ) -> Iterator[Document]:
        """The surviving documents, in input order."""
        for document in documents:
            self.documents_in += 1
            self.chars_in += len(document.text)
            kept: Document | None = document
            for step, stats in zip(self.steps, self.stats):
                stats.documents_in += 1
                stats.chars_in += len(kept.text)
                result = step.process(kept)
                if isinstance(result, Removed):
                    if on_reject is not None:
                        on_reject(Rejection.of(kept, step.name, result.reason))
                    kept = None
                    break
                kept = result
                stats.documents_out += 1
                stats.chars_out += len(kept.text)
            if kept is not None:
                self.documents_out += 1
                self.chars_out += len(kept.text)
                yield kept
        for step, stats in zip(self.steps, self.stats):
            counts = getattr(step, "replacements", None)
            if isinstance(counts, Counter):
                stats.replacements = dict(sorted(counts.items()))

    def report(self) -> CurationReport:
        return CurationReport(
            steps=self.stats,
            documents_in=self.documents_in,
            documents_out=self.documents_out,
            chars_in=self.chars_in,
            chars_out=self.chars_out,
            seconds=time.perf_counter() - self._start,
        )


def curate(
    documents: Iterable[Document], steps: Sequence[Step], *, on_reject: Callable[[Rejection], None] | None = None
) -> tuple[list[Document], CurationReport]:
    """Run ``steps`` over an in-memory list of documents (the library entry point; the CLI streams)."""
    documents = list(documents)
    pipeline = Pipeline(steps)
    if pipeline.needs_prepass:
        pipeline.prepare(lambda: documents)
    kept = list(pipeline.run(documents, on_reject=on_reject))
    return kept, pipeline.report()
