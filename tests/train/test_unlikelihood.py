"""The unlikelihood term of SFT (Welleck et al. 2019, sequence-level): on a hand-made batch whose
mask holds 1 (learn), 0 (context) and -1 (unlikely), the objective's loss equals a float64 numpy
transcription of sum_{mask=1} -log p + alpha * sum_{mask=-1} -log(1 - p) from the model's logits;
its gradient lowers the probability of the unlikely targets; a chat marks exactly the text after
``unlikely_from`` with -1 and learns nothing else of that message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.config import get_size
from afmkit.data.chat import read_chat_jsonl, tokenize_conversation
from afmkit.errors import UserError
from afmkit.model.transformer import init_params, logits_fn
from afmkit.train.objectives import ModelView, assistant_sft
from afmkit.train.step import Batch

CONFIG = get_size("test-tiny")
PARAMS = init_params(CONFIG, jax.random.PRNGKey(3))
ALPHA = 0.7


def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 13), dtype=np.int32)
    mask = np.zeros((2, 12), np.float32)
    mask[:, 2:6] = 1
    mask[:, 7:11] = -1
    return Batch(
        tokens=jnp.asarray(tokens[:, :-1]),
        targets=jnp.asarray(tokens[:, 1:]),
        positions=jnp.tile(jnp.arange(12, dtype=jnp.int32), (2, 1)),
        segment_ids=jnp.ones((2, 12), jnp.int32),
        loss_mask=jnp.asarray(mask),
    )


def objective_loss(params, b):
    view = ModelView(config=CONFIG, params=params, adapters=None, compute_dtype=jnp.float32)
    return assistant_sft(ALPHA).loss(view, None, b)


def test_the_loss_is_the_published_formula():
    b = batch()
    loss, sums = objective_loss(PARAMS, b)
    logits = np.asarray(logits_fn(PARAMS, b.tokens, config=CONFIG), np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    target = np.take_along_axis(log_p, np.asarray(b.targets)[..., None], -1)[..., 0]
    mask = np.asarray(b.loss_mask)
    ce = -(target * (mask == 1)).sum()
    ul = -(np.log1p(-np.exp(target)) * (mask == -1)).sum()
    # fp32 log-softmax over a small vocabulary: each term within ~1e-6 relative of float64
    np.testing.assert_allclose(float(loss), ce + ALPHA * ul, rtol=1e-5)
    np.testing.assert_allclose(float(sums["cross_entropy"]), ce, rtol=1e-5)
    assert float(sums["count"]) == (mask == 1).sum()  # the denominator counts learned tokens only


def test_a_gradient_step_lowers_the_unlikely_targets_probability():
    b = batch()
    unlikely = np.asarray(b.loss_mask) == -1

    def unlikely_log_p(params):
        logits = logits_fn(params, b.tokens, config=CONFIG)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return float((jnp.take_along_axis(log_p, b.targets[..., None], -1)[..., 0] * unlikely).sum())

    grads = jax.grad(lambda p: objective_loss(p, b)[0])(PARAMS)
    stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, PARAMS, grads)
    assert unlikely_log_p(stepped) < unlikely_log_p(PARAMS)


def test_a_chat_marks_the_text_after_unlikely_from(tiny_model, tmp_path):
    loop = "Drink water. Take a walk. Take a walk. Take a walk."
    start = loop.index("Take a walk.", 14)  # the first repeat
    messages = [{"role": "user", "content": "Tips?"}, {"role": "assistant", "content": loop, "unlikely_from": start}]
    example = tokenize_conversation(tiny_model.tokenizer, messages)
    assert 1 not in example.mask  # nothing of that message is learned as a target
    unlikely = [i for i, m in zip(example.ids, example.mask) if m == -1]
    assert tiny_model.tokenizer.decode(unlikely).strip() == loop[start:]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "hi", "unlikely_from": 5}]}\n')
    with pytest.raises(UserError, match="'unlikely_from' must be a character offset"):
        read_chat_jsonl(bad)
