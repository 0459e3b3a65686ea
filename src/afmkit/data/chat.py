"""Chat data for SFT: JSONL conversations -> token ids with an assistant-only loss mask ->
packed training rows with segment ids.

A line is ``{"messages": [{"role", "content"}, ...]}``. Which tokens are the assistant's is
derived from the model's own chat template (each assistant turn's span is the text between the
conversation rendered up to the turn's generation prompt and rendered through the turn), so
whatever the template adds around a reply (ChatML's ``<|im_end|>``) is learned too.

An assistant message may carry ``"unlikely_from": N`` (a character offset into its content): then
its first N characters are context only and the rest is text the model must *not* say (e.g. a
repetition loop from where it first repeats): the tokens that end inside it are marked -1 for the unlikelihood
loss (``train.objectives``), and nothing of that message is learned as a target.

Packing (as ``data.packing`` does for pre-training): whole conversations are laid into rows of
``seq_len`` (input, target) pairs, longest first into the first row with room; each gets its own
segment id, so the model never attends across conversations, and positions that restart at 0.
Only targets that are assistant tokens of the same conversation are learned; the rest of a row
is padding (segment 0, no loss). ``ChatLoader`` serves the rows in the pre-training loader's
deterministic, resumable order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afmkit.data.loader import PackedLoader
from afmkit.data.packing import TokenStream
from afmkit.errors import UserError


@dataclasses.dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 where the token is the assistant's to learn; -1 where it is unlikely text


def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file; clear errors name the bad line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"training data {path} does not exist; give a JSONL file of {{'messages': [...]}} lines")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: expected a JSON object with a 'messages' list") from None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise UserError(f"{path}:{number}: 'messages' must be a list of {{'role': str, 'content': str}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{path}:{number}: the conversation has no assistant message to learn from")
        for m in messages:
            start = m.get("unlikely_from")
            if start is not None and (
                m["role"] != "assistant" or not isinstance(start, int) or not 0 <= start < len(m["content"])
            ):
                raise UserError(
                    f"{path}:{number}: 'unlikely_from' must be a character offset inside an assistant message's content"
                )
        conversations.append(messages)
    if not conversations:
        raise UserError(f"{path} holds no conversations; give at least one {{'messages': [...]}} line")
    return conversations


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> Example:
    """Token ids of the whole conversation and a mask of the assistant's tokens."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=False)
    spans, unlikely = [], []
    for i, message in enumerate(plain):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(plain[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(plain[: i + 1], add_generation_prompt=False)
        if not text.startswith(before) or not text.startswith(through):
            raise UserError("the chat template does not render conversations prefix by prefix; cannot mask turns")
        offset = messages[i].get("unlikely_from")
        if offset is None:
            spans.append((len(before), len(through)))
        else:
            content_start = through.index(message["content"], len(before))
            unlikely.append((content_start + offset, content_start + len(message["content"])))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)

    def within(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
        return any(s <= start and end <= e and end > start for s, e in ranges)

    def reaches_into(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
        # a token that starts just before the offset (" Take": the space is the token's) counts
        return any(s < end <= e and end > start for s, e in ranges)

    mask = [1 if within(spans, a, b) else -1 if reaches_into(unlikely, a, b) else 0 for a, b in encoding.offsets]
    return Example(ids=list(encoding.ids), mask=mask)


def fits(example: Example, seq_len: int) -> bool:
    """A conversation of n tokens fills n - 1 (input, target) slots of a row."""
    return len(example.ids) - 1 <= seq_len


def pack_conversations(examples: Sequence[Example], *, seq_len: int) -> dict[str, np.ndarray]:
    """Training rows ``[R, seq_len]`` (``train.step.Batch``'s fields) holding every example
    (each must ``fit``): first-fit, longest first, so rows are as full as this greedy gets."""
    if any(not fits(e, seq_len) for e in examples):
        raise ValueError("every conversation must fit a row; filter with fits() first")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].ids), i))
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for i in order:
        need = len(examples[i].ids) - 1
        for r, free in enumerate(room):
            if free >= need:
                rows[r].append(i)
                room[r] -= need
                break
        else:
            rows.append([i])
            room.append(seq_len - need)
    shape = (len(rows), seq_len)
    fields = {
        "tokens": np.zeros(shape, np.int32),
        "targets": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
    }
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members, start=1):
            ids, mask = np.asarray(examples[i].ids, np.int32), np.asarray(examples[i].mask, np.float32)
            n = len(ids) - 1
            fields["tokens"][r, at : at + n] = ids[:-1]
            fields["targets"][r, at : at + n] = ids[1:]
            fields["positions"][r, at : at + n] = np.arange(n)
            fields["segment_ids"][r, at : at + n] = segment
            fields["loss_mask"][r, at : at + n] = mask[1:]  # learn a target only if it is the assistant's
            at += n
    return fields


@dataclasses.dataclass
class ChatLoader(PackedLoader):
    """``PackedLoader``'s order (a permutation per epoch from the seed; the step is the whole
    state) over packed chat rows: ``ChatLoader.of(rows, global_batch=..., seed=...)``."""

    packed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, packed: dict[str, np.ndarray], *, global_batch: int, seed: int) -> ChatLoader:
        digest = hashlib.sha256()
        for name in sorted(packed):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(packed[name]).tobytes())
        stream = TokenStream(np.zeros(0, np.int32), np.zeros(0, np.int64), digest.hexdigest()[:24])
        seq_len = next(iter(packed.values())).shape[1]  # any rows: packed tokens, or pairs
        return cls(stream=stream, seq_len=seq_len, global_batch=global_batch, seed=seed, packed=packed)

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise UserError("the batch size must be positive")
        self.rows = len(next(iter(self.packed.values()), ()))
        if self.rows == 0:
            raise UserError("no conversations to train on")

    def next_batch(self, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
        index = self.row_indices(self.step, positions)
        self.step += 1
        return {name: array[index] for name, array in self.packed.items()}
