"""The inference engine on the real SmolLM2 weights and on a random tiny model."""

import jax
import jax.numpy as jnp
import pytest

from afmkit.errors import UserError
from afmkit.infer import engine as engine_module
from afmkit.infer.engine import Engine
from afmkit.infer.sampling import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the ocean and the moon, please.",
    "List three prime numbers.",
]


def _chat_ids(model, text):
    return model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_batched_rows_of_different_lengths_match_running_each_alone(smollm2):
    prompts = [_chat_ids(smollm2, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3
    sampling = SamplingParams(max_new_tokens=24)
    together = smollm2.engine.generate(prompts, sampling)
    for prompt, batched in zip(prompts, together):
        alone = smollm2.engine.generate([prompt], sampling)[0]
        assert batched.tokens == alone.tokens
        assert batched.text == alone.text


def test_rows_stop_on_their_own_at_eos(smollm2):
    prompts = [
        _chat_ids(smollm2, "What is the capital of France?"),
        _chat_ids(smollm2, "Write a long story about a dragon."),
    ]
    short, long = smollm2.engine.generate(prompts, SamplingParams(max_new_tokens=60))
    assert short.finish_reason == "stop" and short.tokens[-1] in smollm2.tokenizer.stop_ids
    assert len(short.tokens) < 60
    assert long.finish_reason == "length" and len(long.tokens) == 60


def test_stop_strings_end_the_row_and_are_not_in_the_text(smollm2):
    out = smollm2.generate("1, 2, 3, 4, 5,", max_new_tokens=40, stop=[" 8"])
    assert out.finish_reason == "stop"
    assert out.text.rstrip().endswith("7,") and " 8" not in out.text


def test_streamed_text_adds_up_to_the_final_text_and_never_shows_a_stop_string(smollm2):
    prompt = [_chat_ids(smollm2, "Count from one to twenty in words, separated by commas.")]
    sampling = SamplingParams(max_new_tokens=48, stop=("twelve", "Twelve"))
    events = list(smollm2.engine.stream(prompt, sampling))
    final = smollm2.engine.generate(prompt, sampling)[0]
    assert "".join(e.text for e in events) == final.text
    assert all("welve" not in e.text for e in events)
    assert events[-1].finish_reason == final.finish_reason
    assert [e.token for e in events] == final.tokens


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(smollm2):
    prompt = _chat_ids(smollm2, "Tell me a fun fact.")
    other = _chat_ids(smollm2, "What is two plus two?")
    sampling = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    first = smollm2.engine.generate([prompt], sampling)[0]
    again = smollm2.engine.generate([prompt], sampling)[0]
    in_batch = smollm2.engine.generate([other, prompt], [SamplingParams(max_new_tokens=5), sampling])[1]
    assert first.tokens == again.tokens == in_batch.tokens
    different = smollm2.engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0.9, seed=99))[0]
    assert different.tokens != first.tokens


def test_top_k_one_is_greedy(smollm2):
    prompt = [_chat_ids(smollm2, "Describe a cat.")]
    greedy = smollm2.engine.generate(prompt, SamplingParams(max_new_tokens=16))[0]
    top1 = smollm2.engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1, seed=3))[0]
    assert top1.tokens == greedy.tokens


def test_prompts_longer_than_a_prefill_chunk_are_prefilled_in_chunks(tiny_model, monkeypatch):
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 32)
    ids = list(range(100, 170))  # 70 tokens: three chunks of 32
    chunked = tiny_model.engine.generate([ids, ids[:20]], SamplingParams(max_new_tokens=6))
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 512)
    whole = tiny_model.engine.generate([ids, ids[:20]], SamplingParams(max_new_tokens=6))
    assert [c.tokens for c in chunked] == [c.tokens for c in whole]


def test_more_prompts_than_max_batch_are_run_in_several_batches(tiny_model):
    engine = Engine(tiny_model.config, tiny_model.params, tiny_model.tokenizer, max_batch=2)
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(5)]
    split = engine.generate(prompts, SamplingParams(max_new_tokens=4))
    whole = tiny_model.engine.generate(prompts, SamplingParams(max_new_tokens=4))
    assert [c.tokens for c in split] == [c.tokens for c in whole]


def test_a_finished_row_frees_its_slot_for_the_next_prompt_at_once(tiny_model):
    """Continuous batching: with 2 slots, a long answer does not hold the short ones back, and
    every row's tokens equal the same prompt generated alone."""
    engine = Engine(tiny_model.config, tiny_model.params, tiny_model.tokenizer, max_batch=2)
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(5)]
    sampling = [SamplingParams(max_new_tokens=n) for n in (40, 3, 3, 3, 3)]
    finished = [e.index for e in engine.stream(prompts, sampling) if e.finish_reason]
    assert finished[-1] == 0  # the four short rows all ran beside the long one
    together = engine.generate(prompts, sampling)
    for prompt, params, row in zip(prompts, sampling, together):
        assert row.tokens == engine.generate([prompt], params)[0].tokens


def test_stop_when_ends_only_the_row_it_names_with_its_reason(tiny_model):
    every = engine_module.STOP_CHECK_EVERY
    prompts = [[5, 6, 7], [8, 9, 10]]
    sampling = SamplingParams(max_new_tokens=3 * every)
    plain = tiny_model.engine.generate(prompts, sampling)
    asked = []

    def stop_when(index, tokens):
        asked.append((index, len(tokens)))
        return "loop" if index == 1 and len(tokens) >= 2 * every else None

    events = list(tiny_model.engine.stream(prompts, sampling, stop_when=stop_when))
    cut = [e.token for e in events if e.index == 1]
    assert cut == plain[1].tokens[: 2 * every]
    assert [e.finish_reason for e in events if e.index == 1][-1] == "loop"
    assert [e.token for e in events if e.index == 0] == plain[0].tokens
    assert all(n % every == 0 for _, n in asked)


def test_calls_in_the_same_bucket_do_not_recompile(tiny_model):
    engine = tiny_model.engine
    engine.generate([[1, 2, 3, 4, 5]], SamplingParams(max_new_tokens=8))
    prefill = engine_module._prefill_chunk._cache_size()
    decode = engine_module._decode_step._cache_size()
    engine.generate([[7, 8, 9]], SamplingParams(max_new_tokens=5))  # other lengths, same buckets
    engine.generate([[7, 8, 9, 10, 11, 12, 13]], SamplingParams(max_new_tokens=8))
    assert engine_module._prefill_chunk._cache_size() == prefill
    assert engine_module._decode_step._cache_size() == decode


def test_decode_step_cost_does_not_grow_with_cache_capacity(tiny_model):
    """The compiled step reads the attended prefix only, whatever the cache's capacity."""
    from afmkit.infer.engine import DecodeState, _decode_step, _empty_cache, cache_capacity
    from afmkit.infer.sampling import SamplerMode, SamplerState

    config, params = tiny_model.config, tiny_model.params
    state = DecodeState(tokens=jnp.zeros((1,), jnp.int32), positions=jnp.full((1,), 5), step=jnp.int32(0))
    sampler = SamplerState.from_params([SamplingParams()])

    def flops_and_bytes(capacity):
        cache = _empty_cache(config=config, batch=1, capacity=capacity, dtype=jnp.float32)
        lowered = _decode_step.lower(
            params,
            cache,
            state,
            sampler,
            config=config,
            attend_len=256,
            mode=SamplerMode.GREEDY,
            activation_dtype=jnp.float32,
        )
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["flops"], cost["bytes accessed"]

    small, large = flops_and_bytes(cache_capacity(5, 100)), flops_and_bytes(cache_capacity(5, 8000))
    assert large[0] == pytest.approx(small[0], rel=0.01)
    weights = sum(x.size * 4 for x in jax.tree.leaves(params))
    assert large[1] < small[1] + 0.05 * weights  # not 32x the cache


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([], SamplingParams(), "empty"),
        ([1] * 1100, SamplingParams(), "context"),
        ([1] * 1000, SamplingParams(max_new_tokens=100), "lower max_new_tokens"),
        ([10**6], SamplingParams(), "vocabulary"),
    ],
)
def test_bad_prompts_get_clear_errors(tiny_model, prompt, sampling, message):
    with pytest.raises(UserError, match=message):
        tiny_model.engine.generate([prompt], sampling)


@pytest.fixture(scope="module")
def smollm2_bf16():
    import afmkit

    return afmkit.load("smollm2-135m-instruct", dtype="bfloat16")


def test_bf16_weights_stay_close_to_fp32(smollm2, smollm2_bf16):
    ids = _chat_ids(smollm2, "Explain photosynthesis in one sentence.")
    exact, rounded = smollm2.logits(ids), smollm2_bf16.logits(ids)
    assert smollm2_bf16.params["embed"].dtype == jnp.bfloat16 and rounded.dtype == exact.dtype
    agree = (exact.argmax(-1) == rounded.argmax(-1)).mean()
    assert agree > 0.9
    assert abs(rounded - exact).mean() < 0.1 * abs(exact).mean()


def test_bf16_single_prompt_matches_the_same_prompt_in_a_batch(smollm2_bf16):
    """A lone bf16 row is decoded beside a padding row on CPUs; it must not notice."""
    model = smollm2_bf16
    prompt, other = _chat_ids(model, QUESTIONS[0]), _chat_ids(model, QUESTIONS[2])
    alone = model.engine.generate([prompt], SamplingParams(max_new_tokens=12))[0]
    batched = model.engine.generate([prompt, other], SamplingParams(max_new_tokens=12))[0]
    assert alone.tokens == batched.tokens
    assert "Paris" in alone.text


def test_unknown_weight_dtype_is_refused():
    import afmkit

    with pytest.raises(UserError, match="bfloat16"):
        afmkit.load("smollm2-135m-instruct", dtype="float8")
