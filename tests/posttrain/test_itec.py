"""``afmkit posttrain itec``: winners are the verifier's best (ties: non-looping, then shorter);
a round writes its samples, winners, adapter, dev comparison and table row; a finished round is
never redone on --resume and its adapter joins the committee; bad input is one line and writes
nothing."""

import json

import jax
import numpy as np
import pytest

from afmkit.adapters.lora import LoraConfig, random_adapter
from afmkit.adapters.peft_io import save_adapter
from afmkit.cli import main
from afmkit.model.transformer import init_params
from afmkit.posttrain import itec as itec_module
from afmkit.posttrain import verifiable
from afmkit.posttrain.itec import ItecSettings, itec, pick_winners, win_rate
from afmkit.posttrain.rollout import Sample

# Constraints a random tiny model meets sometimes: "no comma" varies from sample to sample.
CONSTRAINTS = {
    "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
    "kwargs": [{}, {"relation": "less than", "num_words": 100}],
}


def prompt_rows(n_train=3, n_dev=2):
    rows = []
    for split, n in (("train", n_train), ("dev", n_dev)):
        for i in range(n):
            key = f"t-{split}-{i}"
            rows.append({"id": key, "key": key, "prompt": f"Tell me about thing {i}.", "split": split, **CONSTRAINTS})
    return rows


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows()))
    return path


def sample(pid, member, reward, tokens, loop=False, finish="stop"):
    return Sample(pid, member, 0, [1], list(range(tokens)), "x", finish, loop, {"strict": reward})


def test_winner_is_the_best_finished_non_looping_reward_then_the_shorter():
    samples = [
        sample("a", "m1", 0.5, 3),
        sample("a", "m2", 1.0, 9),  # best reward wins although longer
        sample("b", "m1", 1.0, 4, loop=True),  # a loop never wins
        sample("b", "m2", 1.0, 8),
        sample("b", "m3", 1.0, 6),  # tie: the shorter
        sample("c", "m1", 0.0, 5),
        sample("c", "m2", 0.0, 5),  # a full tie: the earlier
        sample("d", "m1", 1.0, 7, finish="length"),  # cut at the limit: not a winner ...
        sample("d", "m2", 0.5, 7),  # ... so the finished one wins
        sample("e", "m1", 1.0, 7, loop=True, finish="loop"),  # cut as a loop: no winner at all
    ]
    winners = pick_winners(samples, "strict")
    assert {pid: s.member for pid, s in winners.items()} == {"a": "m2", "b": "m3", "c": "m1", "d": "m2"}
    assert pick_winners(samples, "strict", keep_truncated=True)["d"].member == "m1"
    assert win_rate(np.array([1.0, 0.5, 0.0]), np.array([0.5, 0.5, 1.0])) == pytest.approx(0.5)


@pytest.mark.slow  # two SFT runs and four rollouts: ~6 min on 2 shared cores
def test_two_rounds_then_resume_never_redoes_a_round(tiny_model, prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    settings = ItecSettings(
        samples=2,
        rounds=1,
        max_new_tokens=8,
        temperature=1.0,
        batch=8,
        sft_steps=2,
        lora_rank=2,
        keep_truncated=True,  # the random tiny model never ends a response in 8 tokens
        quiet=True,
    )
    table = itec(tiny_model, ["base"], prompts_file, out, settings)
    assert [row["round"] for row in table] == [1]
    round_dir = out / "round-01"
    samples = [json.loads(line) for line in (round_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2  # 3 train prompts x 1 member x K=2
    rows = {r["id"]: r for r in prompt_rows()}
    rewards = verifiable.instruction_rewards([rows[s["prompt_id"]] for s in samples], [s["text"] for s in samples])
    np.testing.assert_array_equal([s["rewards"]["strict"] for s in samples], rewards.strict)
    row = table[0]
    assert row["mean_reward"] == pytest.approx(rewards.strict.mean())
    best = [max(rewards.strict[i : i + 2]) for i in range(0, 6, 2)]
    assert row["best_reward"] == pytest.approx(np.mean(best))
    winners = [json.loads(line) for line in (round_dir / "winners.jsonl").read_text().splitlines()]
    assert len(winners) == row["winners_kept"] == sum(b > 0 for b in best)
    for w in winners:
        assert w["messages"][0]["content"] == rows[w["prompt_id"]]["prompt"] and w["reward"] > 0
    assert (round_dir / "adapter" / "adapter_config.json").is_file()
    dev = [json.loads(line) for line in (round_dir / "dev.jsonl").read_text().splitlines()]
    old = [json.loads(line) for line in (out / "dev-00.jsonl").read_text().splitlines()]
    assert [d["prompt_id"] for d in dev] == ["t-dev-0", "t-dev-1"]
    assert row["dev_win_rate"] == win_rate([d["reward"] for d in dev], [d["reward"] for d in old])

    # Resume with two rounds: round 1 is kept as it is (no rollout for its prompts, no SFT), its
    # adapter joins round 2's committee.
    calls = []
    real_rollout = itec_module.rollout

    def spy(members, prompts, rollout_settings, **kwargs):
        calls.append(([m.name for m in members], rollout_settings.samples))
        return real_rollout(members, prompts, rollout_settings, **kwargs)

    monkeypatch.setattr(itec_module, "rollout", spy)
    before = (round_dir / "samples.jsonl").stat().st_mtime_ns
    table = itec(
        tiny_model, ["base"], prompts_file, out, ItecSettings(**{**settings.__dict__, "rounds": 2, "resume": True})
    )
    assert [row["round"] for row in table] == [1, 2]
    assert (round_dir / "samples.jsonl").stat().st_mtime_ns == before
    assert calls[0] == ([tiny_model.name, "itec-round-01"], 2)  # round 2's committee; then its dev answers
    assert len(calls) == 2 and calls[1][1] == 1
    assert table[1]["members"] == [tiny_model.name, "itec-round-01"]
    assert (out / "round-02" / "adapter" / "adapter_config.json").is_file()
    # A third resume with the same rounds does nothing at all.
    calls.clear()
    itec(tiny_model, ["base"], prompts_file, out, ItecSettings(**{**settings.__dict__, "rounds": 2, "resume": True}))
    assert calls == []


@pytest.mark.slow  # a rollout and one SFT step: ~2 min on 2 shared cores
def test_the_editor_joins_the_committee(tiny_model, tmp_path):
    # random text never comes in double quotes; the editor always adds them
    rows = [
        {**r, "instruction_id_list": ["startend:quotation", "punctuation:no_comma"], "kwargs": [{}, {}]}
        for r in prompt_rows()
    ]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = ItecSettings(
        samples=2, max_new_tokens=8, temperature=1.0, batch=8, sft_steps=1, lora_rank=2, keep_truncated=True, quiet=True
    )
    settings = ItecSettings(**{**settings.__dict__, "edit": True})
    (row,) = itec(tiny_model, ["base"], prompts_file, tmp_path / "run", settings)
    round_dir = tmp_path / "run" / "round-01"
    read = lambda name: [json.loads(line) for line in (round_dir / name).read_text().splitlines()]  # noqa: E731
    samples, edits, winners = read("samples.jsonl"), read("edits.jsonl"), read("winners.jsonl")
    by_id = {r["id"]: r for r in rows}
    # every sample gets a quoted copy, scored by the verifier
    assert [(e["prompt_id"], e["index"]) for e in edits] == [(s["prompt_id"], s["index"]) for s in samples]
    for e in edits:
        assert e["member"] == tiny_model.name + "+edit" and e["text"][0] == e["text"][-1] == '"'
        assert "," not in e["text"]
        verdict = verifiable.instruction_rewards([by_id[e["prompt_id"]]], [e["text"]]).strict[0]
        assert e["rewards"]["strict"] == verdict == 1.0
    # a prompt's winner is its best candidate, edits included; the table counts the editor's wins
    assert all(w["reward"] == 1.0 and w["member"].endswith("+edit") for w in winners) and len(winners) == 3
    assert row["edited_winners"] == 3
    assert row["mean_reward"] == pytest.approx(np.mean([s["rewards"]["strict"] for s in samples]))


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return tiny_model.save(tmp_path_factory.mktemp("ckpt") / "afm-tiny")


@pytest.fixture(scope="module")
def foreign_adapter(tiny_model, tmp_path_factory):
    """An adapter saved for another base of the same shapes (other random weights)."""
    other = init_params(tiny_model.config, jax.random.PRNGKey(99))
    adapter = random_adapter(tiny_model.config, LoraConfig(rank=2, alpha=4.0), jax.random.PRNGKey(1), name="other")
    return save_adapter(tmp_path_factory.mktemp("adapters") / "other", adapter, config=tiny_model.config, params=other)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "is empty"),
        ("missing-member", "committee member"),
        ("foreign-adapter", "another base model"),
        ("k0", "--samples must be at least 1"),
        ("adapted-model", "loads with an adapter"),  # rounds would train over the bare base
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    case, message, checkpoint, foreign_adapter, prompts_file, tmp_path, capsys
):
    committee, samples = "base", "2"
    if case == "empty":
        prompts_file.write_text("")
    if case == "missing-member":
        committee = f"base,{tmp_path / 'no-such-adapter'}"
    if case == "foreign-adapter":
        committee = f"base,{foreign_adapter}"
    if case == "k0":
        samples = "0"
    model = "smollm2-135m-afm" if case == "adapted-model" else str(checkpoint)
    out = tmp_path / "out"
    argv = ["posttrain", "itec", "--model", model, "--committee", committee, "--prompts", str(prompts_file)]
    assert main([*argv, "--samples", samples, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    if case == "k0":
        assert "RL" in err  # says which restriction is whose
