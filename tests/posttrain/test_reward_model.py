"""The reward model: heads on the last non-pad token, LoRA and packed int4 trunks, a short
training run, and save/load refusing another base or tokenizer."""

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import afmkit
from afmkit.adapters.lora import LoraConfig, SingleAdapter, random_adapter, single
from afmkit.config import get_size
from afmkit.data.tokenizer import load_tokenizer
from afmkit.errors import UserError
from afmkit.model.packed import dequantize_params, pack_params
from afmkit.model.transformer import forward, init_params
from afmkit.posttrain import losses
from afmkit.posttrain import reward_model as rm

CONFIG = get_size("test-tiny")
# Compiled once per shape: eager op-by-op forwards and gradients take minutes on a busy CPU.
outputs_fn = jax.jit(functools.partial(rm.reward_outputs, config=CONFIG))
hidden_fn = jax.jit(
    lambda params, tokens, adapters: forward(
        params, tokens, jnp.arange(tokens.shape[1])[None], None, config=CONFIG, adapters=adapters
    )[0]
)


@pytest.fixture(scope="module")
def base():
    """test-tiny with random weights and SmolLM2's tokenizer (only its fingerprint is used here)."""
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    return afmkit.LanguageModel(CONFIG, params, load_tokenizer("smollm2-135m-instruct"), name="tiny-random")


@pytest.fixture(scope="module")
def heads():
    return rm.init_reward_heads(CONFIG, jax.random.PRNGKey(1))


def rows_batch(rows, length):
    """Right-padded rows; padding holds random tokens, which must not matter."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(len(rows), length)).astype(np.int32)
    segment_ids = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        segment_ids[i, : len(row)] = 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)


def reference_outputs(params, heads, row, adapters=None):
    """The row alone (no padding) through forward; the heads applied in float64 numpy to the
    final hidden state of its last token."""
    hidden = hidden_fn(params, jnp.asarray([row], jnp.int32), adapters)
    h = np.asarray(hidden[0, -1], np.float64)
    score = h @ np.asarray(heads["score"]["w"], np.float64) + float(heads["score"]["b"])
    grades = np.einsum("d,dhl->hl", h, np.asarray(heads["grades"]["w"], np.float64)) + np.asarray(heads["grades"]["b"])
    return score, grades


ROWS = [[5, 17, 300, 2], [9, 9, 40, 41, 42, 43, 2], [100]]
# fp32 forward on a padded vs unpadded row: the same sums in a different order (attention over
# masked keys adds exact zeros; the matmuls may block differently), a few ulps of O(1) values;
# 1e-5 absolute is ~100 ulps.
ATOL = 1e-5


def test_scores_are_read_at_each_rows_last_token_whatever_the_padding(base, heads):
    tokens, positions, segment_ids = rows_batch(ROWS, 12)
    scores, grade_logits = outputs_fn(base.params, heads, tokens, positions, segment_ids)
    assert scores.shape == (3,) and grade_logits.shape == (3, len(rm.GRADE_NAMES), rm.GRADE_LEVELS)
    for i, row in enumerate(ROWS):
        score, grades = reference_outputs(base.params, heads, row)
        np.testing.assert_allclose(scores[i], score, atol=ATOL, rtol=1e-5)
        np.testing.assert_allclose(grade_logits[i], grades, atol=ATOL, rtol=1e-5)
    # The scores differ between rows: the head reads the row's own last token, not a fixed slot.
    assert len(set(np.round(np.asarray(scores), 4))) == 3


def test_a_lora_trunk_changes_scores_and_gradients_reach_only_heads_and_adapter(base, heads):
    adapter = random_adapter(CONFIG, LoraConfig(rank=4, targets=("q", "v", "down")), jax.random.PRNGKey(2), b_std=0.05)
    adapter = adapter.astype(jnp.float32)
    tokens, positions, segment_ids = rows_batch(ROWS[:2], 8)
    with_lora, _ = outputs_fn(base.params, heads, tokens, positions, segment_ids, adapters=single(adapter))
    without, _ = outputs_fn(base.params, heads, tokens, positions, segment_ids)
    for i, row in enumerate(ROWS[:2]):
        np.testing.assert_allclose(
            with_lora[i], reference_outputs(base.params, heads, row, single(adapter))[0], atol=ATOL, rtol=1e-5
        )
    assert np.abs(np.asarray(with_lora - without)).max() > 1e-3

    def loss(trainable, params):
        head_weights, lora_weights = trainable
        scores, grade_logits = rm.reward_outputs(
            params,
            head_weights,
            tokens,
            positions,
            segment_ids,
            config=CONFIG,
            adapters=SingleAdapter(lora_weights, adapter.config.scale),
        )
        total, _ = losses.reward_model_loss(
            scores[:1],
            scores[1:],
            jnp.array([0]),
            grade_logits,
            jnp.zeros((2, 4), jnp.int32),
            jnp.ones((2, 4)),
            grade_weight=0.5,
        )
        return total

    grads = jax.jit(jax.grad(loss))((heads, adapter.weights), base.params)
    for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
    # Every head weight learns; the score's bias cannot (it cancels in chosen - rejected).
    assert np.abs(np.asarray(grads[0]["score"]["b"])).max() == 0
    for g in (grads[0]["score"]["w"], grads[0]["grades"]["w"], grads[0]["grades"]["b"]):
        assert np.abs(np.asarray(g)).max() > 0
    assert np.abs(np.asarray(grads[1][0]["wq"]["b"])).max() > 0


def test_a_packed_int4_base_scores_like_its_dequantized_weights(base, heads):
    packed = pack_params(base.params, bits=4)
    tokens, positions, segment_ids = rows_batch(ROWS, 8)
    got, _ = outputs_fn(packed, heads, tokens, positions, segment_ids)
    want, _ = outputs_fn(dequantize_params(packed), heads, tokens, positions, segment_ids)
    # The native int4 kernel rounds each matmul's activations to bf16 (relative 2^-8); about ten
    # such matmuls in series across test-tiny's 2 layers keep the score within ~10 * 2^-8 = 4%
    # of its scale (the scores are O(1)), so 0.05 absolute is a loose bound that a wrong weight
    # layout (errors O(1)) still fails.
    np.testing.assert_allclose(got, want, atol=0.05)
    grad = jax.jit(
        jax.grad(lambda h: rm.reward_outputs(packed, h, tokens, positions, segment_ids, config=CONFIG)[0].sum())
    )(heads)
    assert np.abs(np.asarray(grad["score"]["w"])).max() > 0


def test_a_few_dozen_steps_learn_a_separable_preference(base):
    """Chosen replies end with token 7, rejected ones with token 8: the heads over the frozen
    trunk must learn to rank held-out pairs of the same kind (random prompts)."""
    rng = np.random.default_rng(3)

    def pairs(n):
        prompts = rng.integers(10, CONFIG.vocab_size, size=(n, 6))
        return rows_batch([[*p, 7] for p in prompts], 8), rows_batch([[*p, 8] for p in prompts], 8)

    def outputs(h, batch):
        return outputs_fn(base.params, h, *batch)[0]

    def loss(h, chosen, rejected):
        total, metrics = losses.reward_model_loss(
            outputs(h, chosen), outputs(h, rejected), jnp.zeros(chosen[0].shape[0], jnp.int32), grade_weight=0.0
        )
        return total / metrics["count"]

    heads = rm.init_reward_heads(CONFIG, jax.random.PRNGKey(4))
    test_chosen, test_rejected = pairs(32)
    optimizer = optax.adam(1e-2)
    state = optimizer.init(heads)
    step = jax.jit(jax.value_and_grad(loss))
    first = None
    for _ in range(40):
        chosen, rejected = pairs(16)
        value, grad = step(heads, chosen, rejected)
        first = value if first is None else first
        updates, state = optimizer.update(grad, state)
        heads = optax.apply_updates(heads, updates)
    margin = np.asarray(outputs(heads, test_chosen) - outputs(heads, test_rejected))
    assert (margin > 0).mean() == 1.0
    # The soft label p = 0.95 bounds the loss below by its entropy (0.199 nats), not 0.
    floor = -(0.95 * np.log(0.95) + 0.05 * np.log(0.05))
    assert float(jax.jit(loss)(heads, test_chosen, test_rejected)) < min(float(first), floor + 0.1)


@pytest.mark.parametrize("trunk", ["base", "adapter", "full"])
def test_a_saved_reward_model_scores_the_same_after_loading(tmp_path, base, heads, trunk):
    adapter = random_adapter(CONFIG, LoraConfig(rank=4), jax.random.PRNGKey(6), b_std=0.05, name="rm")
    full = jax.tree.map(lambda w: w * 1.01, base.params)
    kwargs = {"adapter": adapter} if trunk == "adapter" else {"trunk_params": full} if trunk == "full" else {}
    rm.save_reward_model(
        tmp_path / "rm", heads, config=CONFIG, base_params=base.params, tokenizer=base.tokenizer, **kwargs
    )
    assert json.loads((tmp_path / "rm" / rm.META_FILE).read_text())["trunk"] == trunk
    loaded = rm.load_reward_model(tmp_path / "rm", base, dtype="float32")
    tokens, positions, segment_ids = rows_batch(ROWS, 8)
    params = full if trunk == "full" else base.params
    adapters = single(adapter) if trunk == "adapter" else None
    want, want_grades = outputs_fn(params, heads, tokens, positions, segment_ids, adapters=adapters)
    got, got_grades = loaded.outputs(tokens, segment_ids)
    # Adapters are stored in fp16 both in memory and on disk, full weights in fp32: bit-exact
    # weights, so only jit-vs-eager summation order differs (a few ulps).
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(got_grades, jax.nn.softmax(want_grades, axis=-1), atol=ATOL)


def test_a_reward_model_for_another_tokenizer_or_base_is_refused_in_one_line(tmp_path, base, heads):
    adapter = random_adapter(CONFIG, LoraConfig(rank=4), jax.random.PRNGKey(6), name="rm")
    rm.save_reward_model(
        tmp_path / "rm", heads, config=CONFIG, base_params=base.params, tokenizer=base.tokenizer, adapter=adapter
    )
    before = sorted(p.name for p in tmp_path.rglob("*"))
    other_tokenizer = copy.copy(base.tokenizer)
    other_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    other_tokenizer._template = None
    other_tok = afmkit.LanguageModel(CONFIG, base.params, other_tokenizer, name="other-tok")
    with pytest.raises(UserError, match="another tokenizer") as error:
        rm.load_reward_model(tmp_path / "rm", other_tok)
    assert "\n" not in str(error.value)
    other_params = init_params(CONFIG, jax.random.PRNGKey(99))
    other_base = afmkit.LanguageModel(CONFIG, other_params, base.tokenizer, name="other-base")
    with pytest.raises(UserError, match="another base model") as error:
        rm.load_reward_model(tmp_path / "rm", other_base)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="not a reward model"):
        rm.load_reward_model(tmp_path, base)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # refusing wrote nothing
