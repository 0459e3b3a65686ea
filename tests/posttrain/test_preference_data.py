"""Preference pairs: hh-rlhf parsing and its held-out split, pairs from scored responses with a
level from the reward gap, the JSONL format, and tokenization into reward-model batches."""

import dataclasses
import json

import pytest

from afmkit.data.tokenizer import load_tokenizer
from afmkit.errors import UserError
from afmkit.files import shared_data_dir
from afmkit.posttrain import preference_data as pd
from afmkit.posttrain.reward_model import GRADE_NAMES


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def hh_row(turns_chosen, turns_rejected):
    render = lambda turns: "".join(f"\n\n{who}: {text}" for who, text in turns)  # noqa: E731
    return json.dumps({"chosen": render(turns_chosen), "rejected": render(turns_rejected)})


def test_hh_rlhf_rows_become_pairs_and_bad_rows_are_counted(tmp_path):
    dialogue = [("Human", "Hi there"), ("Assistant", "Hello!"), ("Human", "Name a fruit.")]
    rows = [
        hh_row([*dialogue, ("Assistant", "An apple.")], [*dialogue, ("Assistant", "No.")]),
        hh_row([("Human", "A"), ("Assistant", "x")], [("Human", "B"), ("Assistant", "y")]),  # other dialogue
        hh_row([("Human", "A"), ("Assistant", "same")], [("Human", "A"), ("Assistant", "same")]),
        hh_row([("Human", "A"), ("Assistant", "")], [("Human", "A"), ("Assistant", "y")]),
        "not json",
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(rows) + "\n")
    pairs, counts = pd.hh_rlhf_pairs([path])
    assert counts == {"kept": 1, "different_dialogue": 1, "identical_replies": 1, "empty_reply": 1, "unparsable": 1}
    (pair,) = pairs
    assert pair.prompt == (
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a fruit."},
    )
    assert (pair.chosen, pair.rejected, pair.level) == ("An apple.", "No.", pd.HH_RLHF_LEVEL)
    with pytest.raises(UserError, match="not a preference level"):
        pd.hh_rlhf_pairs([path], level=4)


def test_the_shared_hh_rlhf_files_and_their_held_out_split():
    if not list(shared_data_dir().glob(pd.HH_RLHF_GLOB)):
        pytest.skip("the shared data folder is not here")
    pairs, counts = pd.hh_rlhf_pairs()
    # 4,666 rows (SOURCES.md): 14 whose dialogues differ before the last turn, 2 identical, the
    # rest parse; the empty-reply count is what the files hold.
    assert sum(counts.values()) == 4666
    assert counts["different_dialogue"] == 14 and counts["identical_replies"] == 2 and counts["unparsable"] == 0
    train, test = pd.split_pairs(pairs)
    # A 10% hash split of ~4,000 distinct prompts: the binomial standard deviation is 0.45
    # points, so 8-12% is over four of them.
    assert 0.08 < len(test) / len(pairs) < 0.12
    assert not {pd.prompt_key(p.prompt) for p in train} & {pd.prompt_key(p.prompt) for p in test}
    _, again_test = pd.split_pairs(list(reversed(pairs)))
    assert {p.source for p in again_test} == {p.source for p in test}


def test_scored_responses_become_pairs_with_a_level_from_the_reward_gap():
    prompt = [{"role": "user", "content": "Write two sentences in capitals."}]
    responses = ["A", "B", "C", "D", "A"]
    rewards = [1.0, 0.0, 0.5, 0.5, 0.0]  # the second "A" repeats the first and is ignored
    pairs = pd.pairs_from_scored(prompt, responses, rewards)
    got = {(p.chosen, p.rejected): p.level for p in pairs}
    # gaps: A-B 1.0 -> 0, A-C 0.5 -> 1, A-D 0.5 -> 1, C-B 0.5 -> 1, D-B 0.5 -> 1; C-D tie: no pair
    assert got == {("A", "B"): 0, ("A", "C"): 1, ("A", "D"): 1, ("C", "B"): 1, ("D", "B"): 1}
    assert [pd.level_from_gap(g) for g in (0.8, 0.75, 0.6, 0.3, 0.1, 1e-9)] == [0, 0, 1, 2, 3, 3]
    with pytest.raises(UserError, match="one reward per response"):
        pd.pairs_from_scored(prompt, ["a", "b"], [1.0])
    with pytest.raises(UserError, match="not a finite number"):
        pd.pairs_from_scored(prompt, ["a", "b"], [1.0, float("nan")])


def test_pairs_round_trip_through_jsonl_and_bad_lines_name_themselves(tmp_path):
    prompt = [{"role": "user", "content": "Hi"}]
    pairs = pd.pairs_from_scored(prompt, ["good", "bad"], [1.0, 0.2], source="synth")
    graded = pd.PreferencePair(tuple(prompt), "x", "y", 3, chosen_grades={"verbosity": 2, "harmlessness": 0})
    path = tmp_path / "pairs.jsonl"
    assert pd.write_pairs_jsonl(path, [*pairs, graded]) == 2
    read = pd.read_pairs_jsonl(path)
    assert read[0] == pairs[0]
    # A pair without a source is named by where it was read.
    assert read[1] == dataclasses.replace(graded, source=f"{path}:2")
    bad = {
        '{"prompt": [], "chosen": "a", "rejected": "b", "level": 0}': "non-empty string or list",
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "level": 7}': "level 7",
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "level": 0, '
        '"chosen_grades": {"style": 1}}': "unknown grade 'style'",
        '{"chosen": "a"}': "expected a JSON object",
    }
    for line, message in bad.items():
        path.write_text(line + "\n")
        with pytest.raises(UserError, match=message) as error:
            pd.read_pairs_jsonl(path)
        assert str(error.value).startswith(f"{path}:1:") and "\n" not in str(error.value)
    path.write_text("\n")
    with pytest.raises(UserError, match="holds no preference pairs"):
        pd.read_pairs_jsonl(path)


def test_a_scored_conversation_ends_at_the_replys_end_of_turn_token(tokenizer):
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]
    ids = pd.conversation_ids(tokenizer, messages)
    # The chat template renders "...An apple.<|im_end|>\n"; the row stops at <|im_end|>, where a
    # generated reply stops too.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert text.endswith("<|im_end|>\n")
    assert ids == tokenizer.encode(text[: -len("\n")])
    assert ids[-1] == tokenizer.token_id("<|im_end|>")
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True))
    assert ids[: len(prompt_ids)] == prompt_ids
    with pytest.raises(UserError, match="end with the assistant's reply"):
        pd.conversation_ids(tokenizer, messages[:1])


def test_pair_batches_pad_rows_and_pairs_and_carry_the_grades(tokenizer):
    prompt = ({"role": "user", "content": "Say hi."},)
    pairs = [
        pd.PreferencePair(prompt, "Hi!", "Go away.", 0, rejected_grades={"harmlessness": 1}),
        pd.PreferencePair(prompt, "Hello there, friend. " * 40, "Hey.", 2),
    ]
    tokenized, dropped = pd.tokenize_pairs(tokenizer, pairs, max_len=64)
    assert dropped == 1 and len(tokenized) == 1  # the long reply would lose its last token
    batch = pd.pair_batch(tokenized, rows=2, length=64)
    chosen = pd.conversation_ids(tokenizer, [*prompt, {"role": "assistant", "content": "Hi!"}])
    rejected = pd.conversation_ids(tokenizer, [*prompt, {"role": "assistant", "content": "Go away."}])
    assert batch["chosen_tokens"].shape == (2, 64) and batch["level"].tolist() == [0, 0]
    assert batch["chosen_tokens"][0, : len(chosen)].tolist() == chosen
    assert batch["rejected_tokens"][0, : len(rejected)].tolist() == rejected
    assert batch["chosen_lengths"].tolist() == [len(chosen), 0]
    assert batch["rejected_lengths"].tolist() == [len(rejected), 0]
    assert (batch["chosen_tokens"][0, len(chosen) :] == 0).all()
    assert batch["pair_mask"].tolist() == [1.0, 0.0]
    h = GRADE_NAMES.index("harmlessness")
    assert batch["chosen_grade_mask"].sum() == 0 and batch["rejected_grade_mask"].sum() == 1
    assert batch["rejected_grade_mask"][0, h] == 1 and batch["rejected_grades"][0, h] == 1
