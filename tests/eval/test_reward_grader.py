"""The reward-model grader of ``afmkit eval sxs``: a reward model trained by ``posttrain reward``
grades pairs by its score difference (checked against the model's own forward on each exchange
alone), its verdicts reach the report with their intervals, and a reward model for another
tokenizer, or a directory that is not one, is refused in one line before anything is written."""

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afmkit
from afmkit.adapters.lora import LoraConfig, random_adapter
from afmkit.cli import main
from afmkit.config import get_size
from afmkit.data.tokenizer import load_tokenizer
from afmkit.errors import UserError
from afmkit.eval import sxs
from afmkit.eval.graders import reward_model_grader
from afmkit.model.transformer import init_params
from afmkit.posttrain import reward_model as rm
from afmkit.posttrain.preference_data import conversation_ids

# test-tiny with SmolLM2's vocabulary, so the real token ids of the exchanges index real rows
CONFIG = dataclasses.replace(get_size("test-tiny"), vocab_size=49_152)
PAIRS = [
    {"key": str(i), "prompt": f"Question {i}: what is {i} plus {i}?", "a": f"It is {2 * i}.", "b": "I do not know."}
    for i in range(4)
]


@pytest.fixture(scope="module")
def base():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    return afmkit.LanguageModel(CONFIG, params, load_tokenizer("smollm2-135m-instruct"), name="tiny-random")


@pytest.fixture(scope="module")
def reward_dir(base, tmp_path_factory):
    """A tiny reward model with a LoRA trunk and random heads, saved as the recipe saves it."""
    # std 1 score weights: margins of a few logits, so strengths other than "negligibly" show up
    heads = rm.init_reward_heads(CONFIG, jax.random.PRNGKey(3))
    heads["score"]["w"] = heads["score"]["w"] * np.sqrt(CONFIG.d_model)
    adapter = random_adapter(CONFIG, LoraConfig(rank=2, alpha=4.0, targets=("q", "v")), jax.random.PRNGKey(4))
    out = tmp_path_factory.mktemp("rm") / "tiny-rm"
    rm.save_reward_model(
        out, heads, config=CONFIG, base_params=base.params, tokenizer=base.tokenizer, adapter=adapter, base_name="x"
    )
    return out


def alone_score(model, prompt, response):
    """The reward of one exchange run alone, unpadded: the trunk's forward at its exact length."""
    from afmkit.adapters.lora import single

    ids = conversation_ids(
        model.tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    )
    tokens = jnp.asarray([ids], jnp.int32)
    run = jax.jit(functools.partial(rm.reward_outputs, config=model.config))
    scores, _ = run(
        model.params,
        model.heads,
        tokens,
        jnp.arange(len(ids))[None],
        jnp.ones_like(tokens),
        adapters=single(model.adapter),
    )
    return float(scores[0])


def test_the_grader_prefers_the_higher_reward_and_the_report_has_intervals(base, reward_dir, tmp_path):
    grader = reward_model_grader(str(reward_dir), base)
    model = rm.load_reward_model(reward_dir, base)
    grades = sxs.grade_pairs(PAIRS, grader, tmp_path, quiet=True)
    assert len(grades) == 2 * len(PAIRS)
    expected_wins = 0
    for pair in PAIRS:
        a, b = alone_score(model, pair["prompt"], pair["a"]), alone_score(model, pair["prompt"], pair["b"])
        # batched with padding (score()) vs alone: the same fp32 math up to reduction order, ~1e-6
        shown = grader.grade(prompt=pair["prompt"], first=pair["a"], second=pair["b"])
        got_a, got_b = (float(x) for x in shown.raw.split(" vs "))
        np.testing.assert_allclose([got_a, got_b], [a, b], rtol=1e-4, atol=1e-4)
        assert shown.winner == ("first" if a > b else "second")
        assert shown.strength == grader_strength(abs(a - b))
        expected_wins += a > b
    report = sxs.report_from_grades(grades, model_a="A", model_b="B", grader=grader.name)
    # both orders agree for a reward model, so each prompt is a clean win or loss for A
    assert report["order_consistency"] == 100.0
    assert report["win"]["count"] == expected_wins and report["lose"]["count"] == len(PAIRS) - expected_wins
    lo, hi = report["win"]["ci95"]
    assert lo <= report["win"]["rate"] <= hi and hi - lo > 0
    assert grader.name == "reward-model:tiny-rm"


def grader_strength(margin):
    """The default thresholds of ``RewardModelGrader`` written out: 2 / 1 / 0.5 logits."""
    if margin >= 2.0:
        return "much better"
    if margin >= 1.0:
        return "better"
    if margin >= 0.5:
        return "slightly better"
    return "negligibly better"


def test_a_reward_model_for_another_tokenizer_is_refused_in_one_line(base, reward_dir):
    other = copy.copy(base.tokenizer)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    other._template = None
    with pytest.raises(UserError, match="another tokenizer") as error:
        reward_model_grader(str(reward_dir), afmkit.LanguageModel(CONFIG, base.params, other, name="other"))
    assert "\n" not in str(error.value)


def test_sxs_refuses_a_directory_that_is_no_reward_model_before_writing(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    not_rm = tmp_path / "empty"
    not_rm.mkdir()
    out = tmp_path / "out"
    args = ["eval", "sxs", "--a", "x", "--b", "y", "--prompts", str(prompts), "--grader", "reward"]
    assert main([*args, "--reward", str(not_rm), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert "is not a reward model" in err and len(err.splitlines()) == 1
    assert not out.exists()
