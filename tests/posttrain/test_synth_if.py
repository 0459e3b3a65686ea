"""``afmkit posttrain synth-if``: prompts whose constraints are if-verifiable's own, deterministic,
decontaminated against IFEval, with a dev split on tasks of its own."""

from __future__ import annotations

import copy
import json
import re

import pytest

from afmkit.cli import main
from afmkit.files import packaged_data, shared_data_dir
from afmkit.posttrain import synth_if

# Tasks in the form the pools give them. The last one is the task part of IFEval's key 2605 ("...
# tech industry? Wrap your entire response with double quotation marks."): too short for a 13-gram
# of its own, but followed by the quotation constraint it would reproduce one of IFEval's.
CLEAN_TASKS = [
    "Suggest three names for a bakery that sells only bread made with sourdough.",
    "How do I keep basil alive on a windowsill during the winter?",
    "Explain why the sky looks red at sunset to a ten year old.",
    "Write a short note thanking a neighbour for watering my plants.",
    "What should I pack for a three day hiking trip in the mountains?",
    "Summarize the plot of a heist movie you would like to see.",
    "Describe how a bicycle gear system works.",
    "Give me tips for learning to juggle with three balls.",
]
BOUNDARY_TASK = "Can you create a list of mega trends in the tech industry?"
# An IFEval prompt (key 1000) planted among the tasks: it must be dropped and counted.
PLANTED = json.loads(packaged_data("ifeval/input_data.jsonl").read_text().splitlines()[0])["prompt"]


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ifeval_ngrams(n: int = 13) -> set[tuple[str, ...]]:
    grams = set()
    for line in packaged_data("ifeval/input_data.jsonl").read_text().splitlines():
        w = words(json.loads(line)["prompt"])
        grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return grams


def rebuilt_descriptions(row: dict) -> list[str]:
    """Each constraint's sentence, rebuilt by the library from the row's kwargs alone."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return [INSTRUCTION_DICT[i](i).build_description(**kw) for i, kw in zip(row["instruction_id_list"], row["kwargs"])]


def template_positions(row: dict) -> set[int]:
    """Word positions of the prompt that belong to a constraint sentence."""
    prompt = words(row["prompt"])
    covered: set[int] = set()
    for description in rebuilt_descriptions(row):
        d = words(description)
        starts = [i for i in range(len(prompt) - len(d) + 1) if prompt[i : i + len(d)] == d]
        assert starts, (description, row["prompt"])
        covered.update(range(starts[-1], starts[-1] + len(d)))
    return covered


def write_tasks(tmp_path, tasks) -> str:
    path = tmp_path / "tasks.txt"
    path.write_text("\n".join(tasks) + "\n")
    return str(path)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["posttrain", "synth-if", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_same_seed_same_file_other_seed_other_prompts(tmp_path, capsys):
    tasks = write_tasks(tmp_path, CLEAN_TASKS)
    outs = [tmp_path / name for name in ("a.jsonl", "b.jsonl", "c.jsonl")]
    for out, seed in zip(outs, (7, 7, 8)):
        assert run(capsys, "--out", out, "--n", 60, "--seed", seed, "--tasks", tasks)[0] == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert synth_if.report_path(outs[0]).read_bytes() == synth_if.report_path(outs[1]).read_bytes()
    a, c = read_rows(outs[0]), read_rows(outs[2])
    assert sum(x["prompt"] != y["prompt"] for x, y in zip(a, c)) > len(a) // 2
    # A larger --n extends the file: the first prompts of each split stay the same.
    assert run(capsys, "--out", tmp_path / "d.jsonl", "--n", 120, "--seed", 7, "--tasks", tasks)[0] == 0
    longer = {r["id"]: r for r in read_rows(tmp_path / "d.jsonl")}
    assert all(longer[r["id"]] == r for r in a)


def test_rows_are_ifeval_rows_whose_constraints_are_the_librarys_and_never_conflict(tmp_path, capsys):
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, INSTRUCTION_DICT, conflict_make

    from afmkit.eval.ifeval import load_prompts, score

    out = tmp_path / "p.jsonl"
    assert run(capsys, "--out", out, "--n", 200, "--seed", 3, "--tasks", write_tasks(tmp_path, CLEAN_TASKS))[0] == 0
    rows = read_rows(out)
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 200
    conflicts = conflict_make(copy.deepcopy(INSTRUCTION_CONFLICTS))
    for row in rows:
        ids = row["instruction_id_list"]
        assert set(row) == {"id", "key", "prompt", "instruction_id_list", "kwargs", "task_source", "task", "split"}
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids) and set(ids) <= set(INSTRUCTION_DICT)
        assert not any(b in conflicts[a] for a in ids for b in ids if a != b), ids
        # The prompt says what the verifier will check: the library rebuilds every sentence from the kwargs.
        for description in rebuilt_descriptions(row):
            assert description in row["prompt"]
        assert row["task"] in CLEAN_TASKS and row["prompt"].startswith(row["task"] + "\n")
        # No draw no response could satisfy: paragraph n+1 of n, fewer than 1 sentence, a word both
        # required and forbidden.
        kw = dict(zip(ids, row["kwargs"]))
        paragraph = kw.get("length_constraints:nth_paragraph_first_word")
        assert not paragraph or paragraph["nth_paragraph"] <= paragraph["num_paragraphs"]
        sentences = kw.get("length_constraints:number_sentences")
        assert not sentences or (sentences["relation"], sentences["num_sentences"]) != ("less than", 1)
        required = set(kw.get("keywords:existence", {}).get("keywords", [])) | {(paragraph or {}).get("first_word")}
        assert not required & set(kw.get("keywords:forbidden_words", {}).get("forbidden_words", []))
    # Every family shows up, and the existing IFEval reader and scorer take the file as it is.
    assert {i for r in rows for i in r["instruction_id_list"]} == set(INSTRUCTION_DICT)
    prompts = load_prompts(out)
    scores = score(prompts, {p.key: "A short reply." for p in prompts})
    assert len(scores) == 200 and all(len(s.strict) == len(s.instruction_ids) for s in scores)


def test_contaminated_tasks_are_dropped_and_counted_and_no_13_gram_outside_the_constraints(tmp_path, capsys):
    tasks = write_tasks(tmp_path, [*CLEAN_TASKS, PLANTED, BOUNDARY_TASK])
    out = tmp_path / "p.jsonl"
    code, stdout, _ = run(
        capsys, "--out", out, "--n", 300, "--max-constraints", 1, "--dev-fraction", 0, "--tasks", tasks
    )
    assert code == 0
    rows = read_rows(out)
    report = json.loads(synth_if.report_path(out).read_text())
    decon = report["decontamination"]
    assert decon["dropped_tasks"] == {"ifeval": 1}
    assert decon["dropped_task_examples"][0]["source"] == "tasks.txt/9"
    assert "1 by ifeval" in stdout
    assert not any(PLANTED in r["prompt"] for r in rows)
    # The boundary task is kept, but never followed by the constraint that completes IFEval's 13-gram.
    boundary_rows = [r for r in rows if r["prompt"].startswith(BOUNDARY_TASK)]
    assert len(boundary_rows) > 20
    assert "startend:quotation" not in {r["instruction_id_list"][0] for r in boundary_rows}
    assert decon["redrawn_prompts_boundary"].get("ifeval", 0) >= 1
    # Independent check: no 13-gram with a word outside the library's constraint sentences is IFEval's.
    benchmark = ifeval_ngrams()
    for row in rows:
        w, template = words(row["prompt"]), template_positions(row)
        for i in range(len(w) - 12):
            if not set(range(i, i + 13)) <= template:
                assert tuple(w[i : i + 13]) not in benchmark, row["prompt"]


def test_dev_split_has_its_share_and_tasks_of_its_own(tmp_path, capsys):
    tasks = [f"Write a short story about a {animal} who learns to {skill}." for animal in
             ("cat", "dog", "fox", "owl", "bear", "frog") for skill in ("swim", "cook", "sing", "paint", "read")]  # fmt: skip
    out = tmp_path / "p.jsonl"
    code, stdout, _ = run(
        capsys, "--out", out, "--n", 90, "--dev-fraction", 0.2, "--tasks", write_tasks(tmp_path, tasks)
    )
    assert code == 0
    rows = read_rows(out)
    dev = [r for r in rows if r["split"] == "dev"]
    train = [r for r in rows if r["split"] == "train"]
    assert len(dev) == 18 and len(train) == 72 and "72 train, 18 dev" in stdout
    assert not {r["task_source"] for r in dev} & {r["task_source"] for r in train}
    assert [r["id"] for r in synth_if.read_prompts(out, split="dev")] == [r["id"] for r in dev]


def test_writing_frame_asks_each_short_question_as_a_piece_of_writing_and_keeps_the_bare_split(tmp_path, capsys):
    questions = [f"How do I teach my {pet} to {trick}?" for pet in ("dog", "cat", "parrot", "rabbit", "ferret")
                 for trick in ("sit", "fetch", "wave", "jump", "spin", "roll over")]  # fmt: skip
    others = ["Suggest three names for a bakery.", "Is it safe\nto swim after eating?", f"Why? {'very ' * 40}so?"]
    tasks = tmp_path / "tasks.jsonl"  # JSONL, so a task can span two lines
    tasks.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in questions + others))
    bare, framed = tmp_path / "bare.jsonl", tmp_path / "framed.jsonl"
    assert run(capsys, "--out", bare, "--n", 60, "--dev-fraction", 0.2, "--tasks", tasks)[0] == 0
    code, stdout, _ = run(capsys, "--out", framed, "--n", 60, "--dev-fraction", 0.2, "--tasks", tasks,
                          "--frame", "writing")  # fmt: skip
    assert code == 0
    rows = read_rows(framed)
    frames = [re.escape(f).replace(re.escape("{q}"), "(.+)") for f in synth_if.WRITING_FRAMES]
    kinds = set()
    for row in rows:
        # The prompt opens with one of the frames around the bare question; the constraints follow.
        kind, match = next((k, m) for k, f in enumerate(frames) if (m := re.match(f, row["task"])))
        assert match.group(1) in questions and row["prompt"].startswith(row["task"])
        assert row["id"].startswith("synth-if-s0-writing-")
        kinds.add(kind)
    assert len(kinds) >= 4  # several kinds of writing, not one
    # Only the short one-line questions are framed: the statement, the two-line and the long question go.
    not_framed = re.search(r"\((\d+) train and (\d+) dev not short questions\)", stdout)
    assert int(not_framed.group(1)) + int(not_framed.group(2)) == len(others), stdout
    # A question held out of the bare file is held out of the framed one: the split is the bare tasks'.
    split_of = {r["task_source"]: r["split"] for r in read_rows(bare)}
    assert all(split_of.get(r["task_source"], r["split"]) == r["split"] for r in rows)
    assert {r["split"] for r in rows} == {"train", "dev"}


def test_writing_frame_with_no_question_is_one_line(tmp_path, capsys):
    code, stdout, stderr = run(capsys, "--out", tmp_path / "p.jsonl", "--n", 10, "--frame", "writing",
                               "--tasks", write_tasks(tmp_path, ["Describe how a bicycle gear system works."] * 1 + CLEAN_TASKS[:1]))  # fmt: skip
    _assert_one_line_and_nothing_written(code, stdout, stderr, tmp_path, "short question to frame")


@pytest.mark.skipif(not (shared_data_dir() / "sft").is_dir(), reason="needs ../shared/data")
def test_the_built_in_pools_give_human_tasks_without_lima(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert run(capsys, "--out", out, "--n", 300)[0] == 0
    rows = read_rows(out)
    pools = {r["task_source"].split("/")[0] for r in rows}
    assert pools <= set(synth_if.POOLS) and "hh-rlhf-helpful" in pools
    report = json.loads(synth_if.report_path(out).read_text())
    assert set(report["task_pools"]) == set(synth_if.POOLS)
    assert report["task_pools"]["self-instruct-seed"]["read"] == 175
    assert not any("Human:" in r["prompt"] or "Assistant:" in r["prompt"] for r in rows)


def _assert_one_line_and_nothing_written(code, stdout, stderr, tmp_path, *needles):
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("afmkit: error:"), stderr
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks.txt"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--n", 0), ("--n must be at least 1",)),
        (("--n", 10, "--tasks", "missing.txt"), ("missing.txt", "no such file")),
        (("--n", 10, "--dev-fraction", 1.5), ("--dev-fraction",)),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needles):
    write_tasks(tmp_path, CLEAN_TASKS)
    args = [a if a != "missing.txt" else tmp_path / "missing.txt" for a in args]
    if "--tasks" not in args:
        args += ["--tasks", tmp_path / "tasks.txt"]
    code, stdout, stderr = run(capsys, "--out", tmp_path / "p.jsonl", *args)
    _assert_one_line_and_nothing_written(code, stdout, stderr, tmp_path, *needles)


def test_missing_shared_data_is_one_line(tmp_path, capsys, monkeypatch):
    write_tasks(tmp_path, CLEAN_TASKS)
    monkeypatch.setenv("AFMKIT_SHARED_DATA", str(tmp_path / "nowhere"))
    code, stdout, stderr = run(capsys, "--out", tmp_path / "p.jsonl", "--n", 10)
    _assert_one_line_and_nothing_written(code, stdout, stderr, tmp_path, "AFMKIT_SHARED_DATA", "--tasks FILE")
