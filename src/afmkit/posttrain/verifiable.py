"""The verifiable-instruction reward and a repetition-loop detector, for rejection sampling and RL.

``instruction_rewards``: per response, the fraction of its prompt's constraints it follows, strict
and loose, as IFEval defines them (loose: the best of the response and its variants with the first
and/or last line removed and asterisks stripped). The verdicts are ``if-verifiable``'s checkers,
run through ``afmkit.eval.ifeval.score`` (the IFEval harness's scorer: seeded, empty responses
fail every instruction), so the reward and the benchmark can never disagree on a verdict.

``is_loop``: whether a response ends in a repetition cycle (a run of tokens repeated back to back
at least ``min_repeats`` times, covering at least ``min_span`` tokens), the failure that sends
SmolLM2 to the token limit on half of IFEval (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from afmkit.errors import UserError


@dataclasses.dataclass(frozen=True)
class InstructionRewards:
    """One entry per response (numpy arrays of shape ``(N,)``)."""

    strict: np.ndarray  # fraction of the prompt's constraints followed, strict
    loose: np.ndarray  # the same, loose
    strict_all: np.ndarray  # bool: every constraint followed (IFEval's prompt-level), strict
    loose_all: np.ndarray
    per_instruction_strict: list[list[bool]]  # the checkers' verdicts, in instruction_id_list order
    per_instruction_loose: list[list[bool]]


def as_ifeval_prompt(prompt: Any) -> Any:
    """An ``IFEvalPrompt`` from one, or from a row with IFEval's fields (synth-if or input_data.jsonl)."""
    from afmkit.eval.ifeval import IFEvalPrompt

    if isinstance(prompt, IFEvalPrompt):
        return prompt
    if not isinstance(prompt, dict) or not {"prompt", "instruction_id_list", "kwargs"} <= set(prompt):
        raise UserError("a reward prompt needs 'prompt', 'instruction_id_list' and 'kwargs' (a synth-if or IFEval row)")
    ids, kwargs = list(prompt["instruction_id_list"]), [dict(k or {}) for k in prompt["kwargs"]]
    if not ids or len(kwargs) != len(ids):
        raise UserError(f"prompt {prompt.get('key', prompt.get('id'))!r}: needs one kwargs dict per instruction id")
    key = prompt.get("key", prompt.get("id", prompt["prompt"]))
    return IFEvalPrompt(key=str(key), prompt=prompt["prompt"], instruction_ids=ids, kwargs=kwargs)


def instruction_rewards(prompts: Sequence[Any], responses: Sequence[str]) -> InstructionRewards:
    """Strict and loose rewards of ``responses[i]`` to ``prompts[i]`` (a prompt repeats for K samples).

    Identical (prompt, response) pairs, common among RL samples, are scored once.
    """
    from afmkit.eval.ifeval import check_instruction_ids, score

    if len(prompts) != len(responses):
        raise UserError(f"{len(prompts)} prompts but {len(responses)} responses; give one prompt per response")
    converted: dict[int, Any] = {}  # id(row) -> IFEvalPrompt: a prompt repeated K times converts once
    for p in prompts:
        if id(p) not in converted:
            converted[id(p)] = as_ifeval_prompt(p)
    as_prompts = [converted[id(p)] for p in prompts]
    check_instruction_ids(list(converted.values()), source="reward prompts")
    verdicts: dict[tuple[int, str], tuple[list[bool], list[bool]]] = {}
    for prompt, response in zip(as_prompts, responses):
        pair = (id(prompt), response)
        if pair not in verdicts:
            # One prompt per call: the scorer seeds its checkers by the prompt's key, so every
            # sample of a prompt is judged under the same seed.
            (result,) = score([prompt], {prompt.key: response})
            verdicts[pair] = (result.strict, result.loose)
    strict = [verdicts[(id(p), r)][0] for p, r in zip(as_prompts, responses)]
    loose = [verdicts[(id(p), r)][1] for p, r in zip(as_prompts, responses)]
    return InstructionRewards(
        strict=np.array([np.mean(s) for s in strict], dtype=np.float64).reshape(-1),
        loose=np.array([np.mean(s) for s in loose], dtype=np.float64).reshape(-1),
        strict_all=np.array([all(s) for s in strict], dtype=bool).reshape(-1),
        loose_all=np.array([all(s) for s in loose], dtype=bool).reshape(-1),
        per_instruction_strict=[list(s) for s in strict],
        per_instruction_loose=[list(s) for s in loose],
    )


# -- repetition loops ----------------------------------------------------------------------------
# Text is compared as words and punctuation marks (spacing ignored), with every number read as the
# same token, so "Step 85: Follow Up / Step 86: Follow Up ..." counts as the loop it is.
TEXT_TOKEN = re.compile(r"\d+|\w+|[^\w\s]")


def _text_tokens(text: str) -> np.ndarray:
    vocabulary: dict[str, int] = {}
    tokens = ["0" if t.isdigit() else t for t in TEXT_TOKEN.findall(text)]
    return np.array([vocabulary.setdefault(t, len(vocabulary)) for t in tokens], dtype=np.int64)


def loop_period(response: str | Sequence[int], *, min_repeats: int = 3, min_span: int = 32) -> int | None:
    """The shortest period ``p`` of the cycle a response ends in, or None.

    The response (text, or token ids compared exactly) ends in a cycle of period ``p`` when its
    last ``max(min_repeats * p, min_span)`` tokens each equal the token ``p`` before: a unit of
    ``p`` tokens repeated back to back, possibly cut off mid-unit by the token limit.
    """
    if min_repeats < 2 or min_span < 1:
        raise UserError(f"need min_repeats >= 2 and min_span >= 1, got {min_repeats} and {min_span}")
    if isinstance(response, str):
        # Text stops at a token boundary, maybe mid-word ("aye, aye, ay"): a cycle that holds up
        # to the last word counts.
        tokens = _text_tokens(response)
        return _period(tokens, min_repeats, min_span) or _period(tokens[:-1], min_repeats, min_span)
    return _period(np.asarray(response, dtype=np.int64), min_repeats, min_span)


def _period(tokens: np.ndarray, min_repeats: int, min_span: int) -> int | None:
    n = len(tokens)
    if n < max(min_span, min_repeats):
        return None
    tail_reversed = tokens[::-1]
    # Only periods whose last token recurs can qualify: one vectorised comparison finds them.
    candidates = np.flatnonzero(tail_reversed[1 : n // min_repeats + 1] == tail_reversed[0]) + 1
    for p in candidates.tolist():
        span = max(min_repeats * p, min_span)
        if span <= n and np.array_equal(tokens[n - span + p :], tokens[n - span : n - p]):
            return p
    return None


def is_loop(response: str | Sequence[int], *, min_repeats: int = 3, min_span: int = 32) -> bool:
    """Whether ``response`` (text or token ids) ends in a repetition loop (see ``loop_period``).

    It judges the content only; a response that also stopped at the token limit
    (``finish_reason == "length"``) is the "ran to the limit repeating itself" case.
    """
    return loop_period(response, min_repeats=min_repeats, min_span=min_span) is not None
