"""Tokenize documents and pack them into fixed-length training rows.

Every document becomes its tokens followed by one separator (``<|endoftext|>`` when the
vocabulary has it, else the tokenizer's EOS), and the documents are laid end to end in one token
stream. Row ``i`` is the ``seq_len + 1`` tokens starting at ``i * seq_len`` (consecutive rows
share one token, so every token is a target exactly once). Inside a row, each document (or piece
of one) gets its own segment id and positions that restart at 0; the model never lets a token
attend to another segment, and no loss is taken on predicting the first token of the next
document. No padding is needed.

Tokenizing the whole standard library takes a while, so the stream is cached on disk, keyed by
the tokenizer and the documents' text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from afmkit.data.corpus import Document
from afmkit.data.tokenizer import Tokenizer
from afmkit.errors import UserError

DOCUMENT_SEPARATOR = "<|endoftext|>"
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """All documents' tokens end to end; ``doc_starts[i]`` is where document ``i`` begins."""

    tokens: np.ndarray  # int32 [N]
    doc_starts: np.ndarray  # int64 [documents]
    fingerprint: str  # identifies tokenizer + documents; a resumed run checks it

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)


def separator_id(tokenizer: Tokenizer) -> int:
    """The token placed after every document."""
    sep = tokenizer.backend.token_to_id(DOCUMENT_SEPARATOR)
    if sep is None:
        sep = tokenizer.eos_id
    if sep is None:
        raise UserError(f"the tokenizer has neither {DOCUMENT_SEPARATOR!r} nor an EOS token to separate documents")
    return sep


def _fingerprint(documents: Sequence[Document], tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    digest.update(tokenizer.backend.to_str().encode())
    for doc in documents:
        digest.update(len(doc.text).to_bytes(8, "little"))
        digest.update(doc.text.encode("utf-8", "replace"))
    return digest.hexdigest()[:24]


def tokenize_documents(
    documents: Sequence[Document], tokenizer: Tokenizer, *, cache_dir: str | os.PathLike | None = None
) -> TokenStream:
    """The token stream of ``documents`` (read from / written to ``cache_dir`` when given)."""
    if not documents:
        raise UserError("the corpus is empty: there are no documents to train on")
    fingerprint = _fingerprint(documents, tokenizer)
    cached = Path(cache_dir) / f"{fingerprint}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached) as data:
                return TokenStream(data["tokens"], data["doc_starts"], fingerprint)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt below
    sep = separator_id(tokenizer)
    encoded = tokenizer.backend.encode_batch([d.text for d in documents], add_special_tokens=False)
    lengths = np.array([len(e.ids) + 1 for e in encoded], np.int64)
    tokens = np.empty(int(lengths.sum()), np.int32)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    for start, enc in zip(doc_starts, encoded):
        n = len(enc.ids)
        tokens[start : start + n] = enc.ids
        tokens[start + n] = sep
    stream = TokenStream(tokens, doc_starts, fingerprint)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp-{os.getpid()}.npz")
        np.savez(tmp, tokens=tokens, doc_starts=doc_starts)
        os.replace(tmp, cached)
    return stream


def num_rows(stream: TokenStream, *, seq_len: int) -> int:
    return max((len(stream.tokens) - 1) // seq_len, 0)


def pack_rows(stream: TokenStream, rows: np.ndarray, *, seq_len: int) -> dict[str, np.ndarray]:
    """Training fields for the given row indices, each ``[len(rows), seq_len]``.

    ``tokens``/``targets`` are the row shifted by one; ``segment_ids`` number the documents of a
    row from 1; ``positions`` restart at 0 per document (and at the row start); ``loss_mask`` is
    1 where the target belongs to the same document as the input.
    """
    rows = np.asarray(rows, np.int64)
    index = rows[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # [n, L+1] stream offsets
    window = stream.tokens[index]
    doc = np.searchsorted(stream.doc_starts, index, side="right") - 1
    segment = (doc - doc[:, :1] + 1).astype(np.int32)
    start = np.maximum(stream.doc_starts[doc], index[:, :1])
    positions = (index - start).astype(np.int32)
    return {
        "tokens": window[:, :-1],
        "targets": window[:, 1:],
        "positions": positions[:, :-1],
        "segment_ids": segment[:, :-1],
        "loss_mask": (segment[:, 1:] == segment[:, :-1]).astype(np.float32),
    }
