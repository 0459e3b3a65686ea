"""``afmkit posttrain edit-data``: one answer per bare train task, rewritten for every train prompt
of that task, kept only when the verifier passes it; answers are saved and reused; dev prompts
are never used; files without the ``task`` field are refused in one line."""

import json

import pytest

from afmkit.cli import EXIT_USER_ERROR, main
from afmkit.errors import UserError
from afmkit.posttrain import edit_data as edit_data_module
from afmkit.posttrain import verifiable
from afmkit.posttrain.edit_data import EditDataSettings, edit_data, rewrite_for_prompts

ANSWER = "Yeast eats sugar, which makes gas. The gas lifts the dough. Heat sets it."


def prompt(i, task_source, instruction, kwargs=None, split="train"):
    task = f"Question {task_source}?"
    return {
        "id": f"p-{i}",
        "key": f"p-{i}",
        "prompt": f"{task}\n\nAn instruction.",
        "instruction_id_list": [instruction],
        "kwargs": [kwargs or {}],
        "task_source": task_source,
        "task": task,
        "split": split,
    }


ROWS = [
    prompt(0, "t1", "change_case:english_lowercase"),
    prompt(1, "t1", "startend:quotation"),
    prompt(2, "t1", "language:response_language", {"language": "fr"}),  # no rewrite: not kept
    prompt(3, "t2", "punctuation:no_comma"),
    prompt(4, "t3", "detectable_format:title"),  # a task beyond --tasks 2: not answered
    prompt(5, "t9", "startend:quotation", split="dev"),
]


def test_answers_are_rewritten_for_every_prompt_of_their_task():
    chats, report = rewrite_for_prompts(ROWS[:5], {"t1": ANSWER, "t2": ANSWER}, min_reward=1.0)
    assert [c["prompt_id"] for c in chats] == ["p-0", "p-1", "p-3"]
    by_id = {r["id"]: r for r in ROWS}
    for c in chats:
        user, assistant = c["messages"]
        assert user == {"role": "user", "content": by_id[c["prompt_id"]]["prompt"]}
        assert verifiable.instruction_rewards([by_id[c["prompt_id"]]], [assistant["content"]]).strict[0] == 1.0
    assert chats[0]["messages"][1]["content"] == ANSWER.lower()
    # each unedited answer breaks its prompt's constraint: kept beside the rewrite as a DPO pair
    assert all(c["rejected"] == ANSWER for c in chats)
    kept, _ = rewrite_for_prompts([prompt(6, "t4", "startend:quotation")], {"t4": f'"{ANSWER}"'}, min_reward=1.0)
    assert "rejected" not in kept[0]  # already followed: nothing to prefer it to
    assert report["prompts_of_those_tasks"] == 4 and report["kept"] == 3
    assert report["families"]["language:response_language"] == {"prompts": 1, "kept": 0}


def test_the_run_answers_train_tasks_once_and_reuses_the_answers(tiny_model, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    asked = []

    def answer(model, tasks, settings, adapter=None):
        asked.append(dict(tasks))
        return {source: None if source == "t3" else ANSWER for source in tasks}

    monkeypatch.setattr(edit_data_module, "answer_tasks", answer)
    out = tmp_path / "chats.jsonl"
    report = edit_data(tiny_model, prompts, out, EditDataSettings(tasks=2, quiet=True))
    assert asked == [{"t1": "Question t1?", "t2": "Question t2?"}]  # train tasks in file order, bare
    assert [json.loads(line)["prompt_id"] for line in out.read_text().splitlines()] == ["p-0", "p-1", "p-3"]
    assert report["kept"] == 3 and json.loads((tmp_path / "chats.report.json").read_text())["kept"] == 3
    # a second run with more tasks answers only the new one
    edit_data(tiny_model, prompts, out, EditDataSettings(tasks=3, quiet=True))
    assert asked[1] == {"t3": "Question t3?"}
    assert "p-4" not in out.read_text()  # t3's answer did not finish
    edit_data(tiny_model, prompts, out, EditDataSettings(tasks=3, quiet=True))
    assert len(asked) == 2  # an unfinished answer is saved as such, not asked again
    assert "p-5" not in out.read_text()  # never a dev prompt


def test_answers_saved_by_another_model_are_refused_not_reused(tiny_model, tmp_path, monkeypatch):
    import jax

    from afmkit.adapters.lora import LoraConfig, random_adapter

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.setattr(
        edit_data_module, "answer_tasks", lambda m, tasks, s, adapter=None: dict.fromkeys(tasks, ANSWER)
    )
    out = tmp_path / "chats.jsonl"
    edit_data(tiny_model, prompts, out, EditDataSettings(tasks=2, quiet=True))
    answers = (tmp_path / "chats.answers.jsonl").read_text()
    adapter = random_adapter(tiny_model.config, LoraConfig(rank=4), jax.random.PRNGKey(0), name="dpo-x")
    with pytest.raises(UserError, match=r"holds answers by .*, not .* \+ dpo-x; give a new --out"):
        edit_data(tiny_model, prompts, out, EditDataSettings(tasks=2, quiet=True), adapter=adapter)
    assert (tmp_path / "chats.answers.jsonl").read_text() == answers  # left as it was


def test_the_answers_come_from_the_adapter_given(tiny_model, tmp_path, monkeypatch):
    import jax

    from afmkit.adapters.lora import LoraConfig, random_adapter
    from afmkit.posttrain import rollout as rollout_module

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    members = []

    def fake_rollout(committee, rows, settings, *, scorers, quiet):
        members.extend(committee)
        return []

    monkeypatch.setattr(rollout_module, "rollout", fake_rollout)
    adapter = random_adapter(tiny_model.config, LoraConfig(rank=4), jax.random.PRNGKey(0), name="dpo-x")
    with pytest.raises(Exception, match="finished no answer"):
        edit_data(tiny_model, prompts, tmp_path / "c.jsonl", EditDataSettings(tasks=1, quiet=True), adapter=adapter)
    assert [m.adapter for m in members] == [adapter]


def test_an_adapter_flag_that_is_no_adapter_is_one_line(tiny_model, tmp_path, capsys):
    checkpoint = tiny_model.save(tmp_path / "afm-tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["posttrain", "edit-data", "--prompts", str(prompts), "--out", str(tmp_path / "c.jsonl"), "--quiet"]
    assert main([*argv, "--model", str(checkpoint), "--adapter", str(tmp_path / "nothing")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "--adapter" in err and "not an adapter directory" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c.jsonl").exists()


@pytest.mark.slow  # a real rollout of the tiny model
def test_a_real_rollout_feeds_the_rewrites(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    settings = EditDataSettings(tasks=2, max_new_tokens=8, temperature=1.0, batch=4, min_reward=0.5, quiet=True)
    answers = edit_data_module.answer_tasks(tiny_model, {"t1": "Question t1?", "t2": "Question t2?"}, settings)
    assert set(answers) == {"t1", "t2"}  # None where the random tiny model ran to the limit


def test_a_file_without_tasks_is_refused_in_one_line(tmp_path, capsys):
    prompts = tmp_path / "old.jsonl"
    prompts.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "task"}) + "\n" for r in ROWS))
    argv = ["posttrain", "edit-data", "--prompts", str(prompts), "--out", str(tmp_path / "c.jsonl"), "--quiet"]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "no 'task' field" in err and "synth-if" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c.jsonl").exists()
