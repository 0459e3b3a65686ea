import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.errors import UserError
from afmkit.infer.sampling import SamplerMode, SamplerState, SamplingParams, _filter_top_k_top_p, sample, seed_keys

LOGITS = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))


def _kept(top_k: int, top_p: float) -> list[int]:
    out = _filter_top_k_top_p(LOGITS, jnp.array([top_k]), jnp.array([top_p]))
    return [i for i in range(4) if np.isfinite(out[0, i])]


@pytest.mark.parametrize(
    ("top_k", "top_p", "kept"),
    [
        (0, 1.0, [0, 1, 2, 3]),
        (2, 1.0, [0, 1]),
        (1, 1.0, [0]),
        (0, 0.5, [0]),
        (0, 0.6, [0, 1]),
        (0, 0.8, [0, 1, 2]),
        (3, 0.6, [0, 1]),
    ],
)
def test_top_k_and_top_p_keep_the_right_tokens(top_k, top_p, kept):
    assert _kept(top_k, top_p) == kept


def test_sampling_follows_the_distribution():
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4000)]
    state = SamplerState.from_params(params)
    tokens = sample(jnp.repeat(LOGITS, 4000, axis=0), state, jnp.int32(0), mode=SamplerMode.SAMPLE)
    freq = np.bincount(np.asarray(tokens), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.03)


def test_draws_across_vocabulary_blocks_follow_the_distribution():
    # 1,000 tokens: three whole blocks of the two-level draw and a padded partial one; the mass
    # sits on tokens in every block (the last token included), the rest never come.
    from afmkit.infer.sampling import DRAW_BLOCK

    probs = np.zeros(1000)
    chosen = [0, 1, DRAW_BLOCK - 1, DRAW_BLOCK, 2 * DRAW_BLOCK + 7, 3 * DRAW_BLOCK + 1, 999]
    probs[chosen] = [0.05, 0.3, 0.1, 0.2, 0.15, 0.12, 0.08]
    with np.errstate(divide="ignore"):
        logits = jnp.asarray(np.log(probs), jnp.float32)[None]
    n = 20000
    state = SamplerState.from_params([SamplingParams(temperature=1.0, seed=s) for s in range(n)])
    tokens = np.asarray(sample(jnp.repeat(logits, n, axis=0), state, jnp.int32(0), mode=SamplerMode.SAMPLE))
    freq = np.bincount(tokens, minlength=1000) / n
    assert set(np.flatnonzero(freq)) <= set(chosen)
    # each frequency within 5 binomial standard deviations of its probability
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / n))


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = jax.random.normal(jax.random.PRNGKey(0), (1, 1000))

    def draw(seed, step):
        state = SamplerState.from_params([SamplingParams(temperature=1.0, seed=seed)])
        return int(sample(logits, state, jnp.int32(step), mode=SamplerMode.SAMPLE)[0])

    assert [draw(7, s) for s in range(5)] == [draw(7, s) for s in range(5)]
    assert [draw(7, s) for s in range(5)] != [draw(8, s) for s in range(5)]


def test_greedy_rows_stay_greedy_in_a_sampling_batch():
    logits = jnp.array([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    state = SamplerState.from_params([SamplingParams(temperature=0.0), SamplingParams(temperature=5.0, top_p=0.9)])
    for step in range(20):
        assert int(sample(logits, state, jnp.int32(step), mode=SamplerMode.FILTERED)[0]) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"max_new_tokens": 0},
        {"seed": -1},
        {"stop": ("",)},
    ],
)
def test_invalid_sampling_parameters_are_refused_with_the_fix(kwargs):
    with pytest.raises(UserError):
        SamplingParams(**kwargs)


def test_mode_is_the_cheapest_that_serves_every_row():
    assert SamplerMode.for_batch([SamplingParams()]) is SamplerMode.GREEDY
    assert SamplerMode.for_batch([SamplingParams(), SamplingParams(temperature=0.7)]) is SamplerMode.SAMPLE
    assert SamplerMode.for_batch([SamplingParams(temperature=0.7, top_k=5)]) is SamplerMode.FILTERED


def _greedy_with_penalties_by_hand(model, prompt, n, presence, frequency):
    """The OpenAI penalty formula transcribed in numpy over full-sequence logits (no cache):
    logit[t] -= presence * (count[t] > 0) + frequency * count[t], counts of generated tokens."""
    ids, counts, out = list(prompt), np.zeros(model.config.vocab_size), []
    for _ in range(n):
        logits = model.logits(ids)[-1].astype(np.float64)
        token = int(np.argmax(logits - presence * (counts > 0) - frequency * counts))
        out.append(token)
        ids.append(token)
        counts[token] += 1
        if token in model.engine.eos_ids:
            break
    return out


def test_presence_and_frequency_penalties_match_the_formula_and_break_loops(smollm2):
    prompt = smollm2.tokenizer.encode("Once upon a time there was a cat. The cat")
    plain = smollm2.engine.generate([prompt], SamplingParams(max_new_tokens=16))[0].tokens
    assert len(set(plain)) < len(plain)  # greedy SmolLM2 repeats itself here
    penalized = SamplingParams(max_new_tokens=16, presence_penalty=0.5, frequency_penalty=1.0)
    # With a row without penalties beside it: each row keeps its own counts and penalties.
    got = smollm2.engine.generate([prompt, prompt], [penalized, SamplingParams(max_new_tokens=16)])
    assert got[0].tokens == _greedy_with_penalties_by_hand(smollm2, prompt, 16, 0.5, 1.0)
    assert got[1].tokens == plain
    assert len(set(got[0].tokens)) > len(set(plain))  # fewer repeats


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -3, float("nan"), float("inf")])
def test_penalties_outside_openais_range_are_refused(field, value):
    with pytest.raises(UserError, match=field):
        SamplingParams(**{field: value})


def test_seed_keys_are_jax_prng_keys():
    """The keys computed without JAX are the ones ``jax.random.PRNGKey`` gives, over the whole range."""
    seeds = [0, 1, 12345, 2**31 - 1, 2**31, 3_000_000_000, 2**32 - 1]
    expected = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in seeds])
    np.testing.assert_array_equal(seed_keys(seeds), expected)
    assert seed_keys(seeds).dtype == np.uint32


# peaked logits and top-k within the head: decided there; flat ones (and a top-k of 1000): the full sort
@pytest.mark.parametrize(("scale", "big_k", "in_head"), [(8.0, 100, True), (0.01, 1000, False)])
def test_the_head_search_keeps_what_a_full_sort_keeps(scale, big_k, in_head, monkeypatch):
    """The nucleus found among each row's 256 largest logits, or by sorting the whole vocabulary
    when a row's top-k or nucleus reaches past them, equals the full sort's for every row."""
    import afmkit.infer.sampling as S

    logits = jax.random.normal(jax.random.PRNGKey(3), (6, 5000)) * scale
    top_k = jnp.array([0, 0, 40, big_k, 0, 3])
    top_p = jnp.array([0.9, 1.0, 0.95, 0.8, 0.5, 1.0])
    largest = jax.lax.top_k(logits, S.NUCLEUS_HEAD)[0]
    k = jnp.where(top_k > 0, top_k, 5000)
    assert bool(jnp.all(S._threshold(logits, largest, k, top_p)[1])) == in_head
    fast = np.isfinite(np.asarray(jax.jit(_filter_top_k_top_p)(logits, top_k, top_p)))
    monkeypatch.setattr(S, "NUCLEUS_HEAD", 5000)
    full = np.isfinite(np.asarray(jax.jit(S._filter_top_k_top_p)(logits, top_k, top_p)))
    np.testing.assert_array_equal(fast, full)
    assert fast[1].all()  # top_k 0, top_p 1: nothing filtered
    assert (fast.sum(1)[[2, 5]] <= [40, 3]).all()


def test_the_bisected_threshold_equals_the_sorted_one():
    """The search that replaces sorting the vocabulary gives the sort's threshold for every row:
    flat and peaked logits, ties, top-k inside and past the head, top-p on and off."""
    import afmkit.infer.sampling as S

    rng = np.random.default_rng(4)
    rows = [rng.standard_normal(5000) * scale for scale in (0.01, 0.5, 1.0, 3.0, 8.0) for _ in range(4)]
    rows.append(np.round(rng.standard_normal(5000), 1))  # many ties
    rows.append(np.full(5000, -2.0))  # all tied
    logits = jnp.asarray(np.stack(rows), jnp.float32)
    n = logits.shape[0]
    top_k = jnp.asarray(rng.choice([0, 1, 3, 300, 4999, 5000], n), jnp.int32)
    top_p = jnp.asarray(rng.choice([0.05, 0.5, 0.9, 0.95, 1.0], n), jnp.float32)
    k = jnp.where(top_k > 0, top_k, 5000)
    want = S._threshold(logits, jnp.sort(logits, axis=-1)[:, ::-1], k, top_p)[0]
    got = jax.jit(S._bisected_threshold)(logits, k, top_p)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
