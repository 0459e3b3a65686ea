"""The verifiable-instruction reward (if-verifiable's verdicts, strict and loose) and the loop detector."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from afmkit.errors import UserError
from afmkit.files import packaged_data, shared_data_dir
from afmkit.posttrain.verifiable import instruction_rewards, is_loop, loop_period

LOWERCASE, POSTSCRIPT, WORDS, END = (
    "change_case:english_lowercase",
    "detectable_content:postscript",
    "length_constraints:number_words",
    "startend:end_checker",
)
ROW = {
    "id": "hand-1",
    "prompt": "Tell me about tea.\n\nAll lowercase, at least 12 words, and a P.S. at the end.",
    "instruction_id_list": [LOWERCASE, POSTSCRIPT, WORDS],
    "kwargs": [{}, {"postscript_marker": "P.S."}, {"relation": "at least", "num_words": 12}],
}
END_ROW = {
    "id": "hand-2",
    "prompt": "Say hi.\n\nFinish your response with this exact phrase Any other questions?.",
    "instruction_id_list": [END],
    "kwargs": [{"end_phrase": "Any other questions?"}],
}
# (row, response, strict verdicts, loose verdicts) written down by hand.
CASES = [
    (ROW, "green tea and black tea come from the same plant, picked and dried in different ways.\n\np.s. try oolong.",
     [True, True, True], [True, True, True]),
    (ROW, "tea is nice.", [True, False, False], [True, False, False]),
    # A capitalised first line: strict fails lowercase; loose drops the first line and passes it.
    (ROW, "Sure! Here is my answer:\ngreen tea and black tea come from the same plant, picked and dried differently.\n"
          "p.s. try oolong.", [False, True, True], [True, True, True]),
    # Bold ending: strict fails the ending; loose strips the asterisks and passes it.
    (END_ROW, "hi there!\n**Any other questions?**", [False], [True]),
    (END_ROW, "hi there! Any other questions?", [True], [True]),
    (END_ROW, "", [False], [False]),
]  # fmt: skip


def library_verdicts(row: dict, response: str) -> tuple[list[bool], list[bool]]:
    """if-verifiable's checkers called directly: strict on the response, loose on any of its variants."""
    from if_verifiable.common import get_loose_transformations
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    strict, loose = [], []
    for iid, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
        checker = INSTRUCTION_DICT[iid](iid)
        checker.build_description(**kwargs)
        strict.append(bool(response.strip()) and bool(checker.check_following(response)))
        loose.append(any(v.strip() and checker.check_following(v) for v in get_loose_transformations(response)))
    return strict, loose


def test_reward_is_the_fraction_of_constraints_the_library_says_are_followed():
    rows, responses = [c[0] for c in CASES], [c[1] for c in CASES]
    rewards = instruction_rewards(rows, responses)
    for i, (row, response, strict, loose) in enumerate(CASES):
        assert library_verdicts(row, response) == (strict, loose), response
        assert rewards.per_instruction_strict[i] == strict and rewards.per_instruction_loose[i] == loose
        assert rewards.strict[i] == pytest.approx(sum(strict) / len(strict))  # exact fractions of <= 3
        assert rewards.loose[i] == pytest.approx(sum(loose) / len(loose))
        assert rewards.strict_all[i] == all(strict) and rewards.loose_all[i] == all(loose)
    # The crafted cases really separate the two modes.
    assert rewards.strict[2] == pytest.approx(2 / 3) and rewards.loose[2] == 1.0
    assert rewards.strict[3] == 0.0 and rewards.loose[3] == 1.0
    assert rewards.strict.shape == rewards.loose.shape == (len(CASES),)


def test_k_samples_per_prompt_are_aligned_and_duplicates_are_scored_once(monkeypatch):
    from afmkit.eval import ifeval

    calls = []
    real_score = ifeval.score
    monkeypatch.setattr(ifeval, "score", lambda p, r: calls.append(1) or real_score(p, r))
    responses = [CASES[0][1], CASES[1][1], CASES[0][1], CASES[2][1]]  # K = 4 samples of one prompt
    rewards = instruction_rewards([ROW] * 4, responses)
    assert rewards.strict.tolist() == pytest.approx([1.0, 1 / 3, 1.0, 2 / 3])
    assert rewards.loose.tolist() == pytest.approx([1.0, 1 / 3, 1.0, 1.0])
    assert len(calls) == 3


@pytest.mark.skipif(
    not (shared_data_dir() / "ifeval" / "eval_results_loose.jsonl").is_file(), reason="needs ../shared/data/ifeval"
)
def test_rewards_agree_with_googles_own_evaluation_of_gpt4_responses():
    """Independent reference: a run of google's evaluation_main on GPT-4's IFEval responses."""
    data = shared_data_dir() / "ifeval"
    prompts = [json.loads(line) for line in packaged_data("ifeval/input_data.jsonl").read_text().splitlines()]
    by_text = {p["prompt"]: p for p in prompts}
    reference = {}
    for mode in ("strict", "loose"):
        for line in (data / f"eval_results_{mode}.jsonl").read_text().splitlines():
            row = json.loads(line)
            reference.setdefault(row["prompt"], {})[mode] = row["follow_instruction_list"]
    responses = {}
    for line in (data / "input_response_data_gpt4_20231107_145030.fixed.jsonl").read_text().splitlines():
        row = json.loads(line)
        responses[row["prompt"]] = row["response"]
    # Every fifth prompt (108), without the two whose checker draws a random letter (keys 1122, 1129).
    texts = [t for t in list(reference)[::5] if by_text[t]["key"] not in (1122, 1129)]
    rewards = instruction_rewards([by_text[t] for t in texts], [responses[t] for t in texts])
    for i, text in enumerate(texts):
        assert rewards.per_instruction_strict[i] == reference[text]["strict"]
        assert rewards.per_instruction_loose[i] == reference[text]["loose"]
        assert rewards.strict[i] == pytest.approx(np.mean(reference[text]["strict"]))


def test_bad_reward_input_is_refused():
    with pytest.raises(UserError, match="2 prompts but 1 responses"):
        instruction_rewards([ROW, ROW], ["x"])
    with pytest.raises(UserError, match="no_such:thing"):
        instruction_rewards([{**ROW, "instruction_id_list": ["no_such:thing"], "kwargs": [{}]}], ["x"])
    with pytest.raises(UserError, match="one kwargs dict per instruction"):
        instruction_rewards([{**ROW, "kwargs": [{}]}], ["x"])


# -- loops ---------------------------------------------------------------------------------------
def brute_force_period(tokens: list[int], min_repeats: int, min_span: int) -> int | None:
    """The definition, literally: the smallest p whose tail of max(min_repeats*p, min_span) tokens
    has every token equal to the one p before."""
    n = len(tokens)
    for p in range(1, n):
        span = max(min_repeats * p, min_span)
        if span <= n and all(tokens[i] == tokens[i - p] for i in range(n - span + p, n)):
            return p
    return None


def test_loops_in_text_are_found_with_their_period():
    assert loop_period("Here is a poem.\n" + "A beacon of light, a shining light, " * 30) == 9
    # Cut off mid-cycle by the token limit: still a loop.
    assert is_loop("Intro text here. " + "aye, aye, " * 40 + "ay")
    # A numbered-list loop: the numbers change, the lines do not.
    assert loop_period("Steps:\n" + "".join(f"Step {i}: Follow Up\n" for i in range(1, 60))) == 5
    # A refrain three times is not enough text to be a loop; thirty times is.
    assert not is_loop("We sang. " + "la la land, " * 3)
    assert is_loop("We sang. " + "la la land, " * 30)


def test_natural_text_is_not_a_loop():
    text = packaged_data("tinyshakespeare/input_head.txt").read_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) > 50
    assert not any(is_loop(p) for p in paragraphs)
    assert not is_loop(text)
    assert not is_loop(CASES[0][1]) and not is_loop("")


def test_token_id_periods_match_the_definition():
    rng = random.Random(0)
    for trial in range(300):
        head = [rng.randrange(50) for _ in range(rng.randrange(0, 40))]
        unit = [rng.randrange(5) for _ in range(rng.randrange(1, 12))]
        tokens = head + unit * rng.randrange(0, 8) + unit[: rng.randrange(len(unit))]
        for min_repeats, min_span in ((3, 32), (2, 8), (4, 1)):
            expected = brute_force_period(tokens, min_repeats, min_span)
            assert loop_period(tokens, min_repeats=min_repeats, min_span=min_span) == expected, (trial, tokens)
            assert loop_period(np.array(tokens), min_repeats=min_repeats, min_span=min_span) == expected
    with pytest.raises(UserError, match="min_repeats"):
        is_loop([1, 2, 3], min_repeats=1)
