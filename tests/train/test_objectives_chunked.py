"""Chunked logits in the objectives: the same loss and gradients as full logits, a compiled
peak that no longer grows with seq x vocab, and the distillation KL against numpy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.config import SIZES
from afmkit.model.transformer import init_params, token_nll
from afmkit.train import objectives
from afmkit.train.objectives import ModelView, lumped_kl, top_k_distribution

CONFIG = SIZES["test-tiny"]


def _view(params, config=CONFIG) -> ModelView:
    return ModelView(config=config, params=params, adapters=None, compute_dtype=jnp.float32)


def _rows(key, rows: int, seq: int, vocab: int):
    tokens = jax.random.randint(key, (rows, seq), 0, vocab)
    targets = jnp.roll(tokens, -1, axis=1)
    positions = jnp.broadcast_to(jnp.arange(seq), (rows, seq))
    mask = (jax.random.uniform(jax.random.fold_in(key, 1), (rows, seq)) > 0.3).astype(jnp.float32)
    return tokens, targets, positions, mask


def _ce(params, tokens, targets, positions, mask, *, seq_chunk: int | None):
    """Summed masked cross-entropy: chunked (``seq_chunk``) or from full ``[B, T, V]`` logits."""
    view = _view(params)
    hidden = view.hidden(tokens, positions, None)
    if seq_chunk is None:
        nll, _ = token_nll(view.logits(hidden), targets)
    else:
        nll, _ = view.per_token(token_nll, hidden, targets, seq_chunk=seq_chunk)
    return (nll * mask).sum()


def test_chunked_cross_entropy_equals_full_logits_loss_and_gradients():
    params = init_params(CONFIG, jax.random.PRNGKey(0), jnp.float32)
    # 13 positions in chunks of 5: the last chunk is padded, which must change nothing.
    batch = _rows(jax.random.PRNGKey(1), 3, 13, CONFIG.vocab_size)
    full, full_grads = jax.value_and_grad(_ce)(params, *batch, seq_chunk=None)
    chunked, chunked_grads = jax.value_and_grad(_ce)(params, *batch, seq_chunk=5)
    # Each token's logits are the same fp32 dot products either way; only the order in which
    # XLA adds the ~30 per-token losses and the per-token gradient contributions may differ:
    # relative error ~ n * 2^-24 with n <= 39 terms, below 1e-5.
    np.testing.assert_allclose(float(chunked), float(full), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(full_grads)):
        scale = float(jnp.abs(b).max()) + 1e-12
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale)


def test_token_cross_entropy_objective_uses_the_chunked_path():
    params = init_params(CONFIG, jax.random.PRNGKey(0), jnp.float32)
    tokens, targets, positions, mask = _rows(jax.random.PRNGKey(2), 2, 40, CONFIG.vocab_size)
    from afmkit.train.step import Batch

    batch = Batch(tokens, targets, positions, jnp.ones_like(tokens), mask)
    loss, sums = objectives.assistant_sft().loss(_view(params), None, batch)
    np.testing.assert_allclose(
        float(loss), float(_ce(params, tokens, targets, positions, mask, seq_chunk=None)), rtol=1e-5
    )
    assert float(sums["count"]) == float(mask.sum())


def _compiled_temp_bytes(config, rows: int, seq: int, seq_chunk: int) -> int:
    """XLA's temporary buffer size for loss + gradients of the masked cross-entropy (compiled, never run)."""
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), jnp.float32))
    ints = jax.ShapeDtypeStruct((rows, seq), jnp.int32)
    mask = jax.ShapeDtypeStruct((rows, seq), jnp.float32)

    def loss(params, tokens, targets, positions, mask):
        view = _view(params, config)
        nll, _ = view.per_token(token_nll, view.hidden(tokens, positions, None), targets, seq_chunk=seq_chunk)
        return (nll * mask).sum()

    compiled = jax.jit(jax.grad(loss)).lower(params, ints, ints, ints, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_logits_peak_memory_does_not_scale_with_seq_times_vocab():
    # Compare two vocabularies at the same sequence: what the vocabulary adds is the logits'
    # share of the peak (attention and the other activations are the same in both).
    rows, seq, chunk, small, large = 2, 512, 32, 8_192, 32_768
    extra_vocab = large - small

    def temp(vocab: int, seq_chunk: int) -> int:
        return _compiled_temp_bytes(
            dataclasses.replace(CONFIG, vocab_size=vocab, max_seq_len=seq), rows, seq, seq_chunk
        )

    unchunked = temp(large, seq) - temp(small, seq)
    chunked = temp(large, chunk) - temp(small, chunk)
    # Full logits: at least one more fp32 [B, T, V] buffer per extra vocabulary entry.
    assert unchunked >= rows * seq * extra_vocab * 4
    # Chunked: a few fp32 [B, chunk, V] buffers (logits, their gradient, the scatter into the
    # tail mask) and the tied embedding's gradient [V, d_model] with its accumulator; nothing
    # that grows with the sequence.
    bound = 4 * rows * chunk * extra_vocab * 4 + 2 * extra_vocab * CONFIG.d_model * 4
    assert chunked <= bound < rows * seq * extra_vocab * 4 / 2


def _numpy_lumped_kl(teacher: np.ndarray, student: np.ndarray, k: int) -> np.ndarray:
    """The lumped KL written out in float64 numpy: top-k of the teacher plus one "other" bucket."""
    out = np.empty(teacher.shape[:-1])
    for index in np.ndindex(*teacher.shape[:-1]):
        t, s = teacher[index].astype(np.float64), student[index].astype(np.float64)
        p = np.exp(t - t.max())
        p /= p.sum()
        q = np.exp(s - s.max())
        q /= q.sum()
        top = np.argsort(-p, kind="stable")[:k]
        p_tail, q_tail = 1.0 - p[top].sum(), 1.0 - q[top].sum()
        out[index] = np.sum(p[top] * np.log(p[top] / q[top])) + p_tail * np.log(p_tail / q_tail)
    return out


def test_lumped_kl_matches_numpy_and_bounds_the_full_kl():
    key_t, key_s = jax.random.split(jax.random.PRNGKey(3))
    teacher = 3.0 * jax.random.normal(key_t, (2, 5, 300))
    student = teacher + jax.random.normal(key_s, teacher.shape)
    k = 16
    ours = np.asarray(lumped_kl(student, *top_k_distribution(teacher, k)))
    expected = _numpy_lumped_kl(np.asarray(teacher), np.asarray(student), k)
    # fp32 log-softmax of logits of magnitude ~10: absolute error ~ 10 * 2^-24 per term, summed
    # over k + 1 = 17 terms weighted by probabilities that add to 1: well below 1e-5.
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    p = jax.nn.softmax(teacher)
    full = np.asarray((p * (jax.nn.log_softmax(teacher) - jax.nn.log_softmax(student))).sum(-1))
    assert np.all(ours >= -1e-6) and np.all(ours <= full + 1e-5)  # coarsening never adds divergence
    same = np.asarray(lumped_kl(teacher, *top_k_distribution(teacher, k)))
    np.testing.assert_allclose(same, 0.0, atol=1e-5)


def test_distillation_objective_is_the_masked_sum_of_chunked_kl():
    teacher_params = init_params(CONFIG, jax.random.PRNGKey(4), jnp.float32)
    student_params = init_params(CONFIG, jax.random.PRNGKey(5), jnp.float32)
    tokens, targets, positions, mask = _rows(jax.random.PRNGKey(6), 2, 37, CONFIG.vocab_size)
    segments = jnp.ones_like(tokens)
    rows = {"tokens": tokens, "positions": positions, "segment_ids": segments}
    teacher = objectives.teacher_top_k(_view(teacher_params), rows, k=8, seq_chunk=16)
    batch = objectives.DistillBatch(tokens, targets, positions, segments, mask, **teacher)
    loss, sums = objectives.Distillation().loss(_view(student_params), None, batch)
    full_teacher = _view(teacher_params)
    teacher_logits = full_teacher.logits(full_teacher.hidden(tokens, positions, segments))
    student_view = _view(student_params)
    student_logits = student_view.logits(student_view.hidden(tokens, positions, segments))
    expected = _numpy_lumped_kl(np.asarray(teacher_logits), np.asarray(student_logits), 8)
    np.testing.assert_allclose(float(loss), float((expected * np.asarray(mask)).sum()), rtol=1e-4)
    assert float(sums["count"]) == float(mask.sum())


def test_teacher_top_k_refuses_k_outside_the_vocabulary():
    from afmkit.errors import UserError

    params = init_params(CONFIG, jax.random.PRNGKey(0), jnp.float32)
    tokens, _, positions, _ = _rows(jax.random.PRNGKey(7), 1, 4, CONFIG.vocab_size)
    rows = {"tokens": tokens, "positions": positions, "segment_ids": jnp.ones_like(tokens)}
    with pytest.raises(UserError, match="--top-k"):
        objectives.teacher_top_k(_view(params), rows, k=CONFIG.vocab_size)


def test_a_teachers_default_adapter_teaches(tiny_model):
    # `compress recover --teacher smollm2-135m-afm` must distil the post-trained model, not its
    # base: add_teacher's top-k are the model's as it generates, its default adapter applied.
    # Checked against the LanguageModel's own logits (the engine's path) in numpy.
    from afmkit.adapters.lora import LoraConfig, random_adapter
    from afmkit.train.teacher import add_teacher, text_rows

    adapter = random_adapter(tiny_model.config, LoraConfig(rank=4), jax.random.PRNGKey(8), b_std=0.5)
    teacher = tiny_model.with_adapter(adapter)
    ids = tiny_model.tokenizer.encode("To be, or not to be, that is the question: whether 'tis nobler")
    rows = add_teacher(teacher, text_rows(ids, 8), k=4, batch=2, quiet=True)
    for model, expect_equal in ((teacher, True), (tiny_model, False)):
        logits = np.stack([np.asarray(model.logits(row.tolist()), np.float64) for row in rows["tokens"]])
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        log_probs -= logits.max(-1, keepdims=True)
        chosen = np.take_along_axis(log_probs, rows["teacher_ids"].astype(np.int64), axis=-1)
        # fp32 logits from two paths (the jitted objective and the engine): agreement to 1e-4
        # nats; the adapter moves them by far more (b_std 0.5), so the base cannot pass.
        assert np.allclose(chosen, rows["teacher_log_probs"], atol=1e-4) == expect_equal
