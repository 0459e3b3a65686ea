import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.config import get_size
from afmkit.model.kv_cache import KVCache
from afmkit.model.transformer import (
    abstract_params,
    cross_entropy_loss,
    forward,
    init_params,
    logical_axes,
    logits_fn,
    output_logits,
)


@pytest.fixture(scope="module")
def tiny():
    config = get_size("test-tiny")
    return config, init_params(config, jax.random.PRNGKey(1))


def test_every_weight_has_one_logical_axis_name_per_dimension(tiny):
    config, params = tiny
    axes = logical_axes(config)
    for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(names) == leaf.ndim


def test_parameter_count_from_config_matches_allocated_weights(tiny):
    config, params = tiny
    assert sum(x.size for x in jax.tree.leaves(params)) == config.total_params
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(config))) == config.total_params


def test_embedding_is_stored_once(tiny):
    _, params = tiny
    assert "lm_head" not in params


def test_incremental_decoding_matches_the_full_forward_pass(tiny):
    config, params = tiny
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, config.vocab_size)
    full = logits_fn(params, tokens, config=config)
    cache = KVCache.zeros(config, batch=2, capacity=32)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    hidden, cache = forward(params, tokens[:, :8], positions, cache, config=config, attend_len=8)
    steps = [output_logits(params, hidden)]
    for t in range(8, 12):
        pos = jnp.full((2, 1), t)
        hidden, cache = forward(params, tokens[:, t : t + 1], pos, cache, config=config, attend_len=16)
        steps.append(output_logits(params, hidden))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)


def test_rows_at_different_positions_do_not_interact(tiny):
    config, params = tiny
    a = jnp.array([[5, 6, 7, 8]])
    b = jnp.array([[9, 10, 11, 12]])
    alone = logits_fn(params, a, config=config)
    together = logits_fn(params, jnp.concatenate([a, b]), config=config)
    np.testing.assert_allclose(together[:1], alone, atol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits(tiny):
    config, params = tiny
    base = jnp.array([[1, 2, 3, 4, 5, 6]])
    changed = base.at[0, 4:].set(jnp.array([100, 200]))
    np.testing.assert_allclose(
        logits_fn(params, base, config=config)[:, :4], logits_fn(params, changed, config=config)[:, :4], atol=1e-6
    )


def test_z_loss_adds_scaled_squared_log_partition():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    targets = jnp.array([[0, 2]])
    loss, parts = cross_entropy_loss(logits, targets, z_loss=1e-2)
    log_z = np.log(np.exp(np.asarray(logits)).sum(-1))[0]
    ce = np.mean(log_z - np.array([2.0, 0.5]))
    np.testing.assert_allclose(parts["cross_entropy"], ce, rtol=1e-6)
    np.testing.assert_allclose(loss, ce + 1e-2 * np.mean(log_z**2), rtol=1e-6)


def test_loss_mask_ignores_masked_positions():
    logits = jnp.array([[[2.0, 0.0], [0.0, 9.0]]])
    targets = jnp.array([[0, 0]])
    masked, _ = cross_entropy_loss(logits, targets, jnp.array([[1, 0]]))
    first_only, _ = cross_entropy_loss(logits[:, :1], targets[:, :1])
    np.testing.assert_allclose(masked, first_only, rtol=1e-6)
