"""Rollouts: members that are adapters of one base share one mixed batch yet each sample equals
that adapter generating alone; samples are deterministic for a seed and independent of the batch
size; rewards are the verifier's; teacher-forced log-probs equal a float64 log-softmax of
``LanguageModel.logits`` (adapters merged into the weights: an independent path)."""

import dataclasses

import jax
import numpy as np
import pytest

import afmkit
from afmkit.adapters.lora import LoraConfig, merge, random_adapter
from afmkit.errors import UserError
from afmkit.infer.sampling import SamplingParams
from afmkit.posttrain import verifiable
from afmkit.posttrain.rollout import (
    Member,
    RolloutSettings,
    chat_prompt_ids,
    response_token_logprobs,
    rollout,
    sample_seed,
)

PROMPTS = [
    {
        "id": "p0",
        "prompt": "Name a fruit. Answer in all lowercase letters.",
        "instruction_id_list": ["change_case:english_lowercase"],
        "kwargs": [{}],
    },
    {
        "id": "p1",
        "prompt": "Say hello. Wrap your entire response with double quotation marks.",
        "instruction_id_list": ["startend:quotation"],
        "kwargs": [{}],
    },
]


@pytest.fixture(scope="module")
def adapters(tiny_model):
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    # b_std large enough that the adapters visibly change what the tiny model samples.
    return [random_adapter(tiny_model.config, lora, jax.random.PRNGKey(s), b_std=0.5, name=f"a{s}") for s in (1, 2)]


def members(tiny_model, adapters):
    return [Member("base", tiny_model), Member("a1", tiny_model, adapters[0]), Member("a2", tiny_model, adapters[1])]


SETTINGS = RolloutSettings(samples=2, max_new_tokens=12, temperature=1.0, seed=7, batch=16)


def test_mixed_adapter_rollout_equals_each_member_alone(tiny_model, adapters):
    stats = {}
    samples = rollout(members(tiny_model, adapters), PROMPTS, SETTINGS, stats=stats)
    assert [(s.prompt_id, s.member, s.index) for s in samples] == [
        (p["id"], m, k) for p in PROMPTS for m in ("base", "a1", "a2") for k in range(2)
    ]
    assert stats["tokens"] == sum(len(s.tokens) for s in samples) and stats["tokens_per_second"] > 0
    by_adapter = {"base": None, "a1": adapters[0], "a2": adapters[1]}
    by_id = {p["id"]: p for p in PROMPTS}
    for member, adapter in by_adapter.items():  # each member alone, in a batch of its own
        own = [s for s in samples if s.member == member]
        alone = tiny_model.engine.generate(
            [chat_prompt_ids(tiny_model.tokenizer, by_id[s.prompt_id]["prompt"]) for s in own],
            [
                SamplingParams(
                    max_new_tokens=12,
                    temperature=1.0,
                    top_p=SETTINGS.top_p,
                    seed=sample_seed(7, s.prompt_id, s.member, s.index),
                )
                for s in own
            ],
            adapters=adapter,
        )
        for s, a in zip(own, alone):
            assert (s.tokens, s.text, s.finish_reason) == (a.tokens, a.text, a.finish_reason)
            assert s.finish_reason == ("length" if len(s.tokens) == 12 else "stop")
            assert s.loop == verifiable.is_loop(s.text)
    # The adapters change what is sampled: the members are not three copies of the base.
    texts = {m: [s.tokens for s in samples if s.member == m] for m in ("base", "a1", "a2")}
    assert texts["base"] != texts["a1"] and texts["a1"] != texts["a2"]
    rewards = verifiable.instruction_rewards(
        [next(p for p in PROMPTS if p["id"] == s.prompt_id) for s in samples], [s.text for s in samples]
    )
    np.testing.assert_array_equal([s.rewards["strict"] for s in samples], rewards.strict)
    np.testing.assert_array_equal([s.rewards["loose"] for s in samples], rewards.loose)


def test_rollout_is_deterministic_and_independent_of_batch_size_and_order(tiny_model, adapters):
    first = rollout(members(tiny_model, adapters), PROMPTS, SETTINGS)
    again = rollout(list(reversed(members(tiny_model, adapters))), PROMPTS, dataclasses.replace(SETTINGS, batch=4))
    key = lambda s: (s.prompt_id, s.member, s.index)  # noqa: E731
    assert {key(s): s.tokens for s in first} == {key(s): s.tokens for s in again}
    other_seed = rollout(members(tiny_model, adapters), PROMPTS, dataclasses.replace(SETTINGS, seed=8))
    assert [s.tokens for s in other_seed] != [s.tokens for s in first]


def test_bad_rollout_input(tiny_model):
    with pytest.raises(UserError, match="at least 1"):
        rollout([Member("base", tiny_model)], PROMPTS, RolloutSettings(samples=0))
    with pytest.raises(UserError, match="distinct"):
        rollout([Member("x", tiny_model), Member("x", tiny_model)], PROMPTS, SETTINGS)
    with pytest.raises(UserError, match="non-empty"):
        rollout([Member("base", tiny_model)], [], SETTINGS)


def reference_logprobs(model, prompt, response):
    """float64 log-softmax of ``LanguageModel.logits`` over prompt + response, at the response."""
    logits = model.logits(list(prompt) + list(response)).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    p = len(prompt)
    return logp[np.arange(p - 1, p - 1 + len(response)), response]


def test_response_token_logprobs_match_the_models_logits_per_row_adapter(tiny_model, adapters):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 49152, n).tolist() for n in (5, 9, 3, 12, 7)]
    responses = [rng.integers(0, 49152, n).tolist() for n in (6, 2, 11, 4, 1)]
    per_row = [None, adapters[0], adapters[1], adapters[0], None]
    got = response_token_logprobs(tiny_model.params, tiny_model.config, prompts, responses, per_row, batch=2)
    assert got.shape == (5, 11)
    merged = {
        id(a): afmkit.LanguageModel(tiny_model.config, merge(tiny_model.params, a), tiny_model.tokenizer)
        for a in adapters
    }
    for i, (p, r, a) in enumerate(zip(prompts, responses, per_row)):
        model = tiny_model if a is None else merged[id(a)]
        # fp32 forward passes of a 4-layer, d=256 model: logits (|z| < ~20) agree to a few 1e-6
        # relative between the batched LoRA path and the merged weights (the update is applied
        # in another order, and fp16 factors are exact in both); 1e-4 absolute is ~5x that.
        np.testing.assert_allclose(got[i, : len(r)], reference_logprobs(model, p, r), atol=1e-4)
        assert np.all(got[i, len(r) :] == 0)
    # One adapter for every row, and the bare base.
    every = response_token_logprobs(tiny_model.params, tiny_model.config, prompts[:2], responses[:2], adapters[1])
    np.testing.assert_allclose(
        every[0, :6], reference_logprobs(merged[id(adapters[1])], prompts[0], responses[0]), atol=1e-4
    )
    bare = response_token_logprobs(tiny_model.params, tiny_model.config, prompts[:1], responses[:1])
    np.testing.assert_allclose(bare[0], reference_logprobs(tiny_model, prompts[0], responses[0]), atol=1e-4)
