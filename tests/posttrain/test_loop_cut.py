"""``afmkit posttrain loop-cut``: a looping answer is cut after the first copy of its repeated
unit, at a sentence end (hand-made texts whose right cut is known by construction); finished
answers are kept whole, answers at the limit without a loop are dropped; greedy answers are
saved and reused; only train prompts are answered; an empty prompt file is one line."""

import json

import pytest

from afmkit.cli import EXIT_USER_ERROR, main
from afmkit.posttrain import loop_cut as loop_cut_module
from afmkit.posttrain.loop_cut import LoopCutSettings, cut_at_loop, loop_cut, loop_cut_chats

OPENING = "Here is a plan for the day. First, wake up early and drink a glass of water."
UNIT = " Then go for a walk in the park and enjoy the fresh air."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a sentence repeated, cut off mid-sentence by the token limit: the sentence is kept once
        (OPENING + UNIT * 6 + " Then go for a", OPENING + UNIT),
        # numbered list items that differ only in their number count as one unit, kept once
        (
            "Steps:\n1. Open the box carefully.\n"
            + "".join(f"{i}. Check the item and note it.\n" for i in range(2, 30)),
            "Steps:\n1. Open the box carefully.\n2. Check the item and note it.",
        ),
        # a unit without a sentence end: cut back to the last sentence end before it
        (OPENING + " and so on and so forth" * 12, OPENING),
    ],
)
def test_a_loop_is_cut_after_its_first_copy(text, expected):
    assert cut_at_loop(text, min_words=3) == expected


def test_no_loop_or_too_little_left_gives_none():
    assert cut_at_loop(OPENING + UNIT) is None
    assert cut_at_loop("yes and no and " * 20) is None  # no sentence end before the loop
    assert cut_at_loop("Sure." + UNIT * 6, min_words=30) is None


def prompt(i, split="train"):
    return {
        "id": f"p-{i}",
        "key": f"p-{i}",
        "prompt": f"Write about topic {i}.\n\nYour response should contain at least 4 sentences.",
        "instruction_id_list": ["length_constraints:number_sentences"],
        "kwargs": [{"relation": "at least", "num_sentences": 4}],
        "task_source": f"t{i}",
        "task": f"Write about topic {i}.",
        "split": split,
    }


ANSWERS = [
    {"prompt_id": "p-0", "text": OPENING + UNIT, "finish_reason": "stop", "loop": False},
    {"prompt_id": "p-1", "text": OPENING + UNIT * 6, "finish_reason": "loop", "loop": True},
    {"prompt_id": "p-2", "text": OPENING + " It goes on", "finish_reason": "length", "loop": False},
]


def test_finished_answers_are_kept_looped_ones_cut_and_marked_unlikely_unfinished_ones_dropped():
    chats, report = loop_cut_chats([prompt(i) for i in range(3)], ANSWERS, LoopCutSettings())
    kinds = [(c["prompt_id"], c["kind"]) for c in chats]
    assert kinds == [("p-0", "finished"), ("p-1", "cut"), ("p-1", "loop")]
    assert chats[1]["messages"] == [
        {"role": "user", "content": prompt(1)["prompt"]},
        {"role": "assistant", "content": OPENING + UNIT},
    ]
    # the whole loop, unlikely from the first repeat: exactly the text after the cut answer
    loop = chats[2]["messages"][1]
    assert loop["content"] == OPENING + UNIT * 6 and loop["content"][: loop["unlikely_from"]] == OPENING + UNIT
    assert [c["reward"] for c in chats[:2]] == [0.0, 0.0]  # three sentences where four were asked
    # the cut answer is preferred to the whole loop (a DPO pair); a finished answer has no other
    assert chats[1]["rejected"] == OPENING + UNIT * 6 and "rejected" not in chats[0]
    assert report["looped"] == 1 and report["cut"] == 1 and report["at_limit_no_loop"] == 1
    assert report["loops_marked_unlikely"] == 1
    kept, _ = loop_cut_chats([prompt(i) for i in range(3)], ANSWERS, LoopCutSettings(min_reward=1.0))
    assert [c["kind"] for c in kept] == ["loop"]


def test_the_run_answers_train_prompts_once_and_reuses_the_answers(tiny_model, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(prompt(i, "dev" if i == 3 else "train")) + "\n" for i in range(4)))
    asked = []

    def answer(model, rows, settings, adapter=None):
        asked.append([r["id"] for r in rows])
        return [dict(a) for a in ANSWERS if a["prompt_id"] in {r["id"] for r in rows}]

    monkeypatch.setattr(loop_cut_module, "greedy_answers", answer)
    out = tmp_path / "chats.jsonl"
    report = loop_cut(tiny_model, prompts, out, LoopCutSettings(prompts_limit=2, quiet=True))
    assert asked == [["p-0", "p-1"]] and report["kept"] == 2 and report["loops_marked_unlikely"] == 1
    loop_cut(tiny_model, prompts, out, LoopCutSettings(prompts_limit=3, quiet=True))
    assert asked[1] == ["p-2"]  # never the dev prompt p-3
    assert json.loads((tmp_path / "chats.report.json").read_text())["answers"] == 3


@pytest.mark.slow  # a real greedy rollout of the tiny model
def test_a_real_greedy_rollout(tiny_model):
    settings = LoopCutSettings(max_new_tokens=8, batch=2, quiet=True)
    answers = loop_cut_module.greedy_answers(tiny_model, [prompt(0), prompt(1)], settings)
    assert [a["prompt_id"] for a in answers] == ["p-0", "p-1"]
    again = loop_cut_module.greedy_answers(tiny_model, [prompt(0), prompt(1)], settings)
    assert [a["text"] for a in again] == [a["text"] for a in answers]  # greedy: the same answers


def test_a_file_without_train_prompts_is_refused_in_one_line(tmp_path, capsys):
    prompts = tmp_path / "dev-only.jsonl"
    prompts.write_text(json.dumps(prompt(0, "dev")) + "\n")
    out = tmp_path / "c.jsonl"
    assert main(["posttrain", "loop-cut", "--prompts", str(prompts), "--out", str(out), "--quiet"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "no train prompts" in err and len(err.splitlines()) == 1
    assert not out.exists()
