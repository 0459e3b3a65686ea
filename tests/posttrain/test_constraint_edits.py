"""The constraint editor: each rewrite makes a plain answer follow its constraint as if-verifiable
judges it; several constraints compose; a constraint already followed is not rebuilt; constraints
without a rewrite are left alone; ``edited_samples`` edits only samples that could win and scores
them like the rollout."""

import numpy as np
import pytest

from afmkit.posttrain import verifiable
from afmkit.posttrain.constraint_edits import EDIT_SUFFIX, edit_response, edited_samples, sentences, trim_words
from afmkit.posttrain.rollout import Sample, verifier_scorer

ANSWER = (
    "Bread rises because yeast eats sugar, which makes gas. The gas fills small pockets in the dough. "
    "Heat in the oven sets the crumb around those pockets. Salt slows the yeast, so it is added with care. "
    "A long rest, in a cool place, gives more flavour."
)
OTHER = "Yeast makes carbon dioxide. The dough traps it. Baking fixes the shape."


def row(instruction, kwargs=None, prompt="Why does bread rise?"):
    return {"key": "p-1", "prompt": prompt, "instruction_id_list": [instruction], "kwargs": [kwargs or {}]}


def follows(prompt, text):
    return verifiable.instruction_rewards([prompt], [text]).per_instruction_strict[0]


@pytest.mark.parametrize(
    "instruction, kwargs",
    [
        ("change_case:english_lowercase", {}),
        ("change_case:english_capital", {}),
        ("startend:quotation", {}),
        ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"}),
        ("combination:repeat_prompt", {"prompt_to_repeat": "Why does bread rise?"}),
        ("detectable_content:postscript", {"postscript_marker": "P.P.S"}),
        ("punctuation:no_comma", {}),
        ("detectable_format:json_format", {}),
        ("detectable_format:title", {}),
        ("detectable_format:number_highlighted_sections", {"num_highlights": 3}),
        ("detectable_format:number_bullet_lists", {"num_bullets": 3}),
        ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}),
        ("length_constraints:number_paragraphs", {"num_paragraphs": 2}),
        (
            "length_constraints:nth_paragraph_first_word",
            {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "heat"},
        ),
        ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}),
        ("length_constraints:number_words", {"num_words": 30, "relation": "less than"}),
        ("keywords:forbidden_words", {"forbidden_words": ["oven", "salt"]}),
        ("keywords:frequency", {"keyword": "yeast", "frequency": 2, "relation": "less than"}),
        ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}),
    ],
)
def test_a_rewrite_makes_the_answer_follow_its_constraint(instruction, kwargs):
    prompt = row(instruction, kwargs)
    assert follows(prompt, ANSWER) == [False]
    edited = edit_response(prompt, ANSWER, alternative=OTHER)
    assert follows(prompt, edited) == [True], edited


def test_two_responses_need_a_second_answer():
    prompt = row("combination:two_responses")
    assert edit_response(prompt, ANSWER) is None  # nothing to pair it with
    edited = edit_response(prompt, ANSWER, alternative=OTHER)
    assert follows(prompt, edited) == [True] and edited.split("******")[1].strip() == OTHER


def test_constraints_compose_in_an_order_that_keeps_each():
    prompt = {
        "key": "p-2",
        "prompt": "Why does bread rise? Answer in lowercase, end with 'any other questions?', wrap it in quotes.",
        "instruction_id_list": [
            "startend:quotation",
            "change_case:english_lowercase",
            "startend:end_checker",
            "detectable_content:postscript",
            "punctuation:no_comma",
        ],
        "kwargs": [{}, {}, {"end_phrase": "Any other questions?"}, {"postscript_marker": "P.S."}, {}],
    }
    edited = edit_response(prompt, ANSWER)
    assert follows(prompt, edited) == [True] * 5, edited
    assert edited.startswith('"bread rises because yeast eats sugar which makes gas.')


def test_a_followed_constraint_is_not_rebuilt_and_one_without_a_rewrite_is_left_alone():
    bullets = "* Yeast makes gas.\n* The dough traps it."
    assert edit_response(row("detectable_format:number_bullet_lists", {"num_bullets": 2}), bullets) is None
    assert edit_response(row("language:response_language", {"language": "fr"}), ANSWER) is None
    assert edit_response(row("keywords:existence", {"keywords": ["crust"]}), ANSWER) is None
    # too few sentences to make four paragraphs: no rewrite rather than a wrong one
    assert edit_response(row("length_constraints:number_paragraphs", {"num_paragraphs": 4}), OTHER[:27]) is None


def test_paragraph_rewrites_keep_the_answers_own_paragraphs_and_wrappers_add_none():
    own = "Yeast eats sugar.\n\nThe gas fills pockets. Heat sets them.\n\nSalt slows yeast."
    stars = edit_response(row("length_constraints:number_paragraphs", {"num_paragraphs": 3}), own)
    assert stars == "Yeast eats sugar.\n\n***\n\nThe gas fills pockets. Heat sets them.\n\n***\n\nSalt slows yeast."
    first_word = {"num_paragraphs": 3, "nth_paragraph": 3, "first_word": "finally"}
    edited = edit_response(row("length_constraints:nth_paragraph_first_word", first_word), own)
    assert edited == own.replace("Salt", "Finally\nSalt")  # a heading line; the text as written
    # the paragraph already starts with the word: nothing to change
    assert (
        edit_response(row("length_constraints:nth_paragraph_first_word", {**first_word, "first_word": "salt"}), own)
        is None
    )
    # a title, a postscript and an end phrase beside it go on their own lines, not new paragraphs
    prompt = {
        "key": "p-3",
        "prompt": "Why does bread rise?",
        "instruction_id_list": [
            "length_constraints:nth_paragraph_first_word",
            "detectable_format:title",
            "detectable_content:postscript",
            "startend:end_checker",
        ],
        "kwargs": [first_word, {}, {"postscript_marker": "P.S."}, {"end_phrase": "Any other questions?"}],
    }
    edited = edit_response(prompt, ANSWER)
    assert follows(prompt, edited) == [True] * 4, edited
    assert edited.startswith("<<Why Does Bread Rise>>\nBread rises") and edited.count("\n\n") == 2


class Words:
    """A tokenizer stand-in: one id per word."""

    def encode(self, text):
        return list(range(len(text.split())))


def sample(pid, member, index, text, finish="stop", loop=False):
    return Sample(pid, member, index, [1, 2], [5] * 3, text, finish, loop, {"strict": 0.0})


def test_edited_samples_edit_only_possible_winners_and_are_scored():
    prompts = {"a": {**row("combination:two_responses"), "key": "a"}, "b": {**row("punctuation:no_comma"), "key": "b"}}
    samples = [
        sample("a", "base", 0, ANSWER),
        sample("a", "base", 1, OTHER),
        sample("b", "base", 0, ANSWER, finish="length"),  # cut at the limit: not edited ...
        sample("b", "base", 1, ANSWER + " a, b, a, b", loop=True),  # ... nor a loop
        sample("b", "adapter", 0, "Plain, short."),
    ]
    edits = edited_samples(samples, prompts, Words(), [verifier_scorer])
    assert [(e.prompt_id, e.member, e.index) for e in edits] == [
        ("a", "base" + EDIT_SUFFIX, 0),
        ("a", "base" + EDIT_SUFFIX, 1),
        ("b", "adapter" + EDIT_SUFFIX, 0),
    ]
    assert edits[0].text.endswith(OTHER) and edits[1].text.endswith(ANSWER)  # each paired with the other
    assert edits[2].text == "Plain short." and edits[2].tokens == [0, 1]
    np.testing.assert_array_equal([e.rewards["strict"] for e in edits], [1.0, 1.0, 1.0])
    assert edits[0].prompt_tokens == [1, 2] and not any(e.loop for e in edits)
    truncated = edited_samples(samples, prompts, Words(), [verifier_scorer], keep_truncated=True)
    assert ("b", "base" + EDIT_SUFFIX, 0) in [(e.prompt_id, e.member, e.index) for e in truncated]


LONG = "Bread needs yeast. The yeast makes gas.\n\nHere are the steps:\n1. Mix the flour.\n2. Knead it well. Then wait.\nBake."


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1, "Bread needs yeast."),  # the first sentence at least
        (7, "Bread needs yeast. The yeast makes gas."),
        (12, "Bread needs yeast. The yeast makes gas."),  # no heading left announcing nothing
        (16, "Bread needs yeast. The yeast makes gas.\n\nHere are the steps:\n1. Mix the flour."),  # "2." ends nothing
        (100, LONG),
    ],
)
def test_trim_words_stops_at_a_sentence_end_within_the_limit(limit, expected):
    assert trim_words(LONG, limit) == expected


def test_sentences_do_not_end_at_abbreviations():
    text = "Yes. P.S. I hope so. Ask Dr. Smith, e.g. today!\nP.P.S. Bye."
    assert sentences(text) == ["Yes.", "P.S. I hope so.", "Ask Dr. Smith, e.g. today!", "P.P.S. Bye."]
