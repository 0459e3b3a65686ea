"""Corpus sources: text files, JSONL files, directories and glob patterns, read as documents.

A source is a path or a glob pattern. A text file is one document; a ``.jsonl`` file is one
document per line (its ``text`` field, or another field chosen by ``text_key``); a directory is
every text or JSONL file below it. Documents come out in a stable order (sources in the order
given, files sorted by path), so the same sources always give the same stream.

With no sources, :func:`stdlib_sources` names text that every machine with Python has: the
standard library's own ``.py`` files.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afmkit.errors import UserError

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py", ".text"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path" for a text file, "path:line" for a JSONL row


def stdlib_sources() -> list[Path]:
    """The Python standard library's ``.py`` files (without site-packages and tests), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def expand_sources(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Resolve paths, directories and glob patterns to a list of readable files.

    A source that matches nothing is an error naming it; so is a directory with no text files.
    """
    files: list[Path] = []
    for source in sources:
        source = str(source)
        if any(ch in source for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"the pattern {source!r} matches no files")
            files.extend(matches)
            continue
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | JSONL_SUFFIXES)
            if not found:
                raise UserError(
                    f"the directory {source} holds no text or JSONL files "
                    f"(looked for {', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))})"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"data path {source} does not exist")
    return files


def iter_documents(
    sources: Sequence[str | os.PathLike], *, text_key: str = "text", split_paragraphs: bool = False
) -> Iterator[Document]:
    """Documents from ``sources`` in a stable order; empty documents are skipped.

    With ``split_paragraphs``, a text file gives one document per paragraph (runs of lines between
    blank lines), its source ``path:line`` naming the paragraph's first line; JSONL rows are unchanged.
    """
    for path in expand_sources(sources):
        if path.suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, text_key=text_key)
        elif split_paragraphs:
            yield from _paragraph_documents(path)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(text, str(path))


def iter_jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line; bad JSON is an error naming the line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None


def _jsonl_documents(path: Path, *, text_key: str) -> Iterator[Document]:
    for line_no, row in iter_jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
            raise UserError(f"{path}:{line_no}: expected an object with a string field {text_key!r}")
        if row[text_key].strip():
            yield Document(row[text_key], f"{path}:{line_no}")


def _paragraph_documents(path: Path) -> Iterator[Document]:
    lines: list[str] = []
    first = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                if not lines:
                    first = line_no
                lines.append(line)
            elif lines:
                yield Document("".join(lines).rstrip("\n"), f"{path}:{first}")
                lines = []
    if lines:
        yield Document("".join(lines).rstrip("\n"), f"{path}:{first}")


def iter_text_chunks(
    sources: Sequence[str | os.PathLike], *, text_key: str = "text", chunk_chars: int = 1 << 20
) -> Iterator[str]:
    """The corpus as a stream of strings for tokenizer training, never holding a whole large file.

    JSONL rows come one per string; a text file comes in pieces of about ``chunk_chars``
    characters, cut only at line ends (BPE pre-tokenization never joins text across a newline run,
    so the cuts do not change what is learned beyond a rare whitespace token).
    """
    for path in expand_sources(sources):
        if path.suffix in JSONL_SUFFIXES:
            for document in _jsonl_documents(path, text_key=text_key):
                yield document.text
            continue
        pending: list[str] = []
        size = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                pending.append(line)
                size += len(line)
                if size >= chunk_chars:
                    yield "".join(pending)
                    pending, size = [], 0
        if pending and "".join(pending).strip():
            yield "".join(pending)


def read_documents(
    sources: Sequence[str | os.PathLike] | None, *, text_key: str = "text", split_paragraphs: bool = False
) -> list[Document]:
    """All documents from ``sources`` (the standard library when ``None``); an empty corpus is an error."""
    documents = list(
        iter_documents(
            stdlib_sources() if sources is None else sources, text_key=text_key, split_paragraphs=split_paragraphs
        )
    )
    if not documents:
        raise UserError(f"the corpus is empty: no non-blank documents in {', '.join(map(str, sources or []))}")
    return documents
