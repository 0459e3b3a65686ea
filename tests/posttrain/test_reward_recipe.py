"""``afmkit posttrain reward``: the command trains a reward model end to end on a toy separable
preference set (the loss falls, held-out pairs, never trained on, are ranked well above chance,
the saved model reproduces the report); the held-out metrics against a numpy transcription;
iTeC samples become pairs ranked by their verifiable reward; bad input is one line and writes
nothing."""

import json
import math

import numpy as np
import pytest

from afmkit.cli import main
from afmkit.errors import UserError
from afmkit.posttrain import preference_data as pd
from afmkit.posttrain import reward as recipe
from afmkit.posttrain.losses import PREFERENCE_LEVEL_PROBS
from afmkit.posttrain.reward_model import load_reward_model
from afmkit.train.metrics import read_metrics

TOPICS = [
    "apples", "rivers", "stones", "clouds", "tigers", "maples", "oceans", "pianos", "lights", "sugar",
    "grapes", "lemons", "trains", "forests", "candles", "deserts", "violins", "comets", "islands", "bridges",
    "owls", "glaciers", "lanterns", "meadows", "harbors", "castles", "rockets", "gardens", "storms", "valleys",
]  # fmt: skip


def toy_pairs():
    """Separable by construction: the chosen reply is always helpful and polite, the rejected one
    always the same curt refusal; only the prompt's topic varies. Level 0 ("significantly
    better", p = 0.95) throughout, so the loss's floor is one number, the entropy H(0.95). A
    short system turn replaces the chat template's long default one."""
    return [
        pd.PreferencePair(
            prompt=({"role": "system", "content": "Be kind."}, {"role": "user", "content": f"A fact on {topic}?"}),
            chosen=f"Sure! {topic} are wonderful.",
            rejected="No.",
            level=0,
            source="toy.jsonl",
        )
        for topic in TOPICS
    ]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return tiny_model.save(tmp_path_factory.mktemp("ckpt") / "afm-tiny")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    pd.write_pairs_jsonl(path, toy_pairs())
    return path


STEPS = 16


def run_reward(checkpoint, data, out, *flags):
    where = ["--model", str(checkpoint), "--dtype", "float32", "--data", str(data), "--out", str(out), "--quiet"]
    return main(["posttrain", "reward", *where, "--batch", "4", "--max-tokens", "40", *flags])


def test_the_command_learns_a_separable_preference_and_reports_held_out_accuracy(
    checkpoint, pairs_file, tmp_path, capsys
):
    out = tmp_path / "rm"
    flags = ["--lora-rank", "4", "--steps", str(STEPS), "--lr", "3e-3", "--warmup", "2", "--test-fraction", "0.3"]
    assert run_reward(checkpoint, pairs_file, out, *flags) == 0
    printed = capsys.readouterr().out
    assert "held-out pair accuracy" in printed and "toy.jsonl" in printed
    curve = [r["loss"] for r in read_metrics(out / "training" / "metrics.jsonl") if "loss" in r]
    # The soft-label loss cannot go below the label's entropy H(0.95) (reached at margin
    # log(0.95/0.05)); random heads start near log 2. The excess over that floor must halve.
    floor = -(0.95 * np.log(0.95) + 0.05 * np.log(0.05))
    assert len(curve) == STEPS and np.mean(curve[-4:]) - floor < 0.5 * (np.mean(curve[:4]) - floor)
    report = json.loads((out / recipe.REPORT_FILE).read_text())
    held = report["held_out"]
    train, test = pd.split_pairs(toy_pairs(), test_fraction=0.3)
    assert held["pairs"] == len(test) >= 5 and report["train_pairs"] == len(train)
    assert held["accuracy"] == 1.0 and held["by_source"]["toy.jsonl"]["pairs"] == len(test)
    # the saved model (fp16 adapter + heads) scores the held-out pairs as the report says
    import afmkit

    base = afmkit.load(checkpoint, dtype="float32")
    scorer = load_reward_model(out, base)
    chosen, rejected = recipe.pair_scores(scorer, test)
    assert np.all(chosen > rejected)
    np.testing.assert_allclose(np.mean(chosen - rejected), held["mean_margin"], rtol=1e-5)
    # --resume of the finished run with another --held-out-limit trains nothing and only scores
    assert run_reward(checkpoint, pairs_file, out, *flags, "--held-out-limit", "2", "--resume") == 0
    again = json.loads((out / recipe.REPORT_FILE).read_text())
    assert again["held_out"]["pairs"] == 2 and again["held_out_pairs_total"] == len(test)
    assert again["steps_done"] == STEPS and again["held_out"]["accuracy"] == 1.0
    assert [r["loss"] for r in read_metrics(out / "training" / "metrics.jsonl") if "loss" in r] == curve


def test_held_out_metrics_match_a_numpy_transcription():
    """Accuracy (chosen strictly above rejected), its standard error, ties and the mean
    soft-label loss, from hand-made scores, against the formulas written out in float64."""

    class FixedScorer:
        def __init__(self, table):
            self.table = table

        def score(self, conversations):
            return np.array([self.table[c[-1]["content"]] for c in conversations], np.float32)

    pairs = [
        pd.PreferencePair(({"role": "user", "content": "q"},), f"c{i}", f"r{i}", level=i % 4, source=f"{src}:{i}")
        for i, src in enumerate(["a.jsonl", "a.jsonl", "b", "b", "b"])
    ]
    chosen = [2.0, -1.0, 0.5, 0.25, 3.0]
    rejected = [1.0, 0.0, 0.5, -2.0, 1.0]
    table = {**{f"c{i}": v for i, v in enumerate(chosen)}, **{f"r{i}": v for i, v in enumerate(rejected)}}
    got = recipe.evaluate_pairs(FixedScorer(table), pairs)
    margin = np.array(chosen, np.float64) - np.array(rejected, np.float64)
    p = np.array([PREFERENCE_LEVEL_PROBS[i % 4] for i in range(5)])
    # -p log sigmoid(m) - (1 - p) log sigmoid(-m), with log sigmoid(x) = -log(1 + e^-x)
    loss = p * np.log1p(np.exp(-margin)) + (1 - p) * np.log1p(np.exp(margin))
    assert got["accuracy"] == 3 / 5 and got["ties"] == 1 and got["pairs"] == 5
    assert got["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    # fp32 scores of magnitude <= 3: the loss agrees with float64 to ~1e-7 relative
    assert got["loss"] == pytest.approx(loss.mean(), rel=1e-6)
    assert got["mean_margin"] == pytest.approx(margin.mean(), rel=1e-6)
    assert got["by_source"]["a.jsonl"] == {"pairs": 2, "accuracy": 0.5, "stderr": math.sqrt(0.25 / 2)}
    assert got["by_source"]["b"]["accuracy"] == pytest.approx(2 / 3)


def test_a_held_out_limit_takes_a_fixed_sample_from_every_source():
    pairs = [
        pd.PreferencePair(({"role": "user", "content": f"q{i}"},), "a", "b", level=1, source=f"s{i % 3}:{i}")
        for i in range(60)
    ]
    sample = recipe.held_out_sample(pairs, 12)
    assert len(sample) == 12 and sample == recipe.held_out_sample(list(reversed(pairs)), 12)[::-1]
    assert {recipe.source_group(p.source) for p in sample} == {"s0", "s1", "s2"}
    assert recipe.held_out_sample(pairs, 0) == pairs


def test_itec_samples_become_pairs_ranked_by_the_verifiable_reward(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "key": "p1", "prompt": "Write two words."}) + "\n")
    run = tmp_path / "itec-run"
    (run / "round-01").mkdir(parents=True)
    (run / "itec.json").write_text(json.dumps({"settings": {"prompts": str(prompts)}, "table": []}))
    samples = [("one", 0.0), ("two words", 1.0), ("two words", 1.0), ("three words here", 0.5), ("hm", 0.0)]
    (run / "round-01" / "samples.jsonl").write_text(
        "".join(
            json.dumps({"prompt_id": "p1", "text": t, "rewards": {"strict": r, "loose": 1.0}}) + "\n"
            for t, r in samples
        )
    )
    pairs = pd.load_pair_sources(str(run))
    got = sorted((p.chosen, p.rejected, p.level) for p in pairs)
    # distinct texts only; equal rewards make no pair; level by gap: 1.0 -> 0, 0.5 -> 1
    assert got == [
        ("three words here", "hm", 1),
        ("three words here", "one", 1),
        ("two words", "hm", 0),
        ("two words", "one", 0),
        ("two words", "three words here", 1),
    ]
    assert all(p.prompt == ({"role": "user", "content": "Write two words."},) for p in pairs)
    assert {recipe.source_group(p.source) for p in pairs} == {"itec-run/round-01"}


def test_pairs_jsonl_accepts_a_string_prompt_and_a_missing_level(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": "Hi?", "chosen": "Hello!", "rejected": "Go away."}) + "\n")
    (pair,) = pd.read_pairs_jsonl(path)
    assert pair.prompt == ({"role": "user", "content": "Hi?"},) and pair.level == pd.DEFAULT_LEVEL


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no preference pairs"),
        ([{"prompt": "q", "chosen": "same", "rejected": "same"}], "are the same text"),
        ([{"prompt": "q", "chosen": "a", "rejected": "b", "level": 7}], "is not a preference level"),
    ],
)
def test_bad_data_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, lines, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    assert run_reward(checkpoint, data, out, "--steps", "1") != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_too_long_pairs_and_an_empty_held_out_part_are_refused_before_writing(tiny_model, tmp_path):
    out = tmp_path / "out"
    pairs = toy_pairs()
    settings = recipe.RewardSettings(max_tokens=8, steps=1, quiet=True)
    with pytest.raises(UserError, match="longer than --max-tokens 8"):
        recipe.train_reward_model(tiny_model, pairs, out, settings)
    one_prompt = [p for p in pairs if p.prompt == pairs[0].prompt]
    with pytest.raises(UserError, match=r"held.out"):
        recipe.train_reward_model(tiny_model, one_prompt, out, recipe.RewardSettings(steps=1, quiet=True))
    assert not out.exists()


def test_a_used_out_directory_is_refused_without_resume(checkpoint, pairs_file, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_reward(checkpoint, pairs_file, out, "--steps", "1") != 0
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
