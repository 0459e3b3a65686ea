"""Batched, resumable generation for evaluations, through the one inference engine.

Prompts are generated in batches (in a seeded random order, sorted by length within
windows of a few batches; see ``generation_order``); each response is appended to a JSONL
results file the moment its row finishes, so an interrupted run resumes with only the missing
prompts (see ``ResultsFile``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from afmkit.data.tokenizer import Message
from afmkit.errors import UserError
from afmkit.eval.jsonl import ResultsFile, write_json_atomic
from afmkit.infer.sampling import SamplingParams

DEFAULT_BATCH_SIZE = 16
SORT_WINDOW_BATCHES = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationItem:
    key: str
    messages: list[Message]  # the conversation; the model's chat template renders it
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # copied into the result row


def check_run_settings(path: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Refuse to resume a results file made with other settings (another model, token limit...).

    The settings of the run that started ``path`` are kept beside it (``<name>.settings.json``);
    mixing responses of two models in one file would silently corrupt the evaluation.
    """
    path = Path(path)
    manifest = path.with_name(path.stem + ".settings.json")
    if manifest.exists():
        try:
            saved = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{manifest} is not valid JSON; delete it if {path} is yours to resume") from None
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed and path.exists() and path.stat().st_size > 0:
            listed = ", ".join(f"{k}: {old!r} before, {new!r} now" for k, (old, new) in changed.items())
            raise UserError(
                f"{path} holds responses generated with other settings ({listed}); "
                "use another --out folder, or the same settings to resume"
            )
    write_json_atomic(manifest, settings)


def generation_order(items: Sequence[GenerationItem], lengths: Sequence[int], *, batch_size: int) -> list[int]:
    """The order to generate ``items`` in: a fixed pseudo-random shuffle (by key), then sorted by
    prompt length within runs of ``SORT_WINDOW_BATCHES`` batches.

    The shuffle makes the responses of an interrupted run a random sample of the prompts (a
    pure length sort would leave only the shortest prompts answered); sorting within each run
    still puts similar lengths in one batch, so prefill pads little.
    """
    shuffled = sorted(range(len(items)), key=lambda i: hashlib.sha256(items[i].key.encode()).hexdigest())
    window = batch_size * SORT_WINDOW_BATCHES
    return [
        i
        for lo in range(0, len(shuffled), window)
        for i in sorted(shuffled[lo : lo + window], key=lambda i: lengths[i])
    ]


def generate_responses(
    model: Any,
    items: Sequence[GenerationItem],
    results: ResultsFile,
    *,
    sampling: SamplingParams,
    batch_size: int = DEFAULT_BATCH_SIZE,
    description: str = "generating",
    quiet: bool = False,
) -> dict[str, float]:
    """Generate a response for every item not already in ``results``; return run statistics.

    Result rows are ``{key, prompt_tokens, response, finish_reason, new_tokens, **extra}``.
    """
    from afmkit.progress import ProgressReporter

    todo = [item for item in items if item.key not in results]
    encoded = [model.tokenizer.encode(model.tokenizer.apply_chat_template(item.messages)) for item in todo]
    order = generation_order(todo, [len(ids) for ids in encoded], batch_size=batch_size)
    start = time.perf_counter()
    with ProgressReporter(
        description, len(items), unit="responses", quiet=quiet, completed=len(items) - len(todo)
    ) as progress:
        try:
            _generate_all(model, todo, encoded, order, results, sampling, batch_size, progress)
        except KeyboardInterrupt:
            print(
                f"\ninterrupted: {len(results)} of {len(items)} responses are saved in {results.path}; "
                "run the same command again to continue",
                file=sys.stderr,
            )
            raise
    elapsed = time.perf_counter() - start
    generated_tokens = sum(results.get(item.key)["new_tokens"] for item in todo if item.key in results)
    return {"generated": len(todo), "generated_tokens": generated_tokens, "generation_s": round(elapsed, 1)}


def _generate_all(model, todo, encoded, order, results, sampling, batch_size, progress) -> None:
    # One stream over every prompt: ``batch_size`` rows decode together and a finished row's
    # slot goes to the next prompt at once, so a response that runs to the limit holds no batch
    # of finished ones back. Greedy rows are batch-invariant, so this changes no response.
    prompts = [encoded[i] for i in order]
    texts: list[list[str]] = [[] for _ in order]
    counts = [0] * len(order)
    for event in model.engine.stream(prompts, sampling, max_batch=batch_size, adapters=model.adapter):
        texts[event.index].append(event.text)
        counts[event.index] += 1
        if event.finish_reason is None:
            continue
        item = todo[order[event.index]]
        results.append(
            {
                "key": item.key,
                **item.extra,
                "response": "".join(texts[event.index]),
                "finish_reason": event.finish_reason,
                "prompt_tokens": len(prompts[event.index]),
                "new_tokens": counts[event.index],
            }
        )
        progress.advance(tokens=counts[event.index])
