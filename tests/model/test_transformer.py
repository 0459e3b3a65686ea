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
    token_nll,
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
    masked, _ = cross_entropy_loss(logits, targets, jnp.array([[1, 0]]), z_loss=0.0)
    first_only, _ = cross_entropy_loss(logits[:, :1], targets[:, :1], z_loss=0.0)
    np.testing.assert_allclose(masked, first_only, rtol=1e-6)


def test_token_nll_is_minus_log_softmax_of_the_target():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 4
    targets = rng.integers(0, 7, size=(2, 3))
    nll, log_z = token_nll(jnp.asarray(logits), jnp.asarray(targets))
    x = logits.astype(np.float64)
    want_log_z = np.log(np.exp(x).sum(-1))
    want = want_log_z - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    # fp32 logsumexp of 7 terms of size ~10: a few ulps of 10, ~1e-6 absolute
    np.testing.assert_allclose(nll, want, atol=1e-5)
    np.testing.assert_allclose(log_z, want_log_z, atol=1e-5)


def numpy_logits(params, tokens, config):
    """The whole model written out in float64 numpy, from the AFM description: pre-norm RMSNorm,
    GQA with half-split RoPE and q/k RMSNorm on the side of RoPE that ``config`` says, SwiGLU,
    tied output embedding."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    eps, hd = config.norm_eps, config.head_dim

    def norm(x, scale):
        return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

    def rope(x):  # x [T, heads, hd]
        half = hd // 2
        inv = 1.0 / config.rope_base ** (np.arange(half) / half)
        ang = np.arange(x.shape[0])[:, None] * inv  # [T, half]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    x = p["embed"][np.asarray(tokens)[0]]  # [T, d], one row
    t = x.shape[0]
    groups = config.n_heads // config.n_kv_heads
    for layer in p["layers"]:
        h = norm(x, layer["attn_norm"])
        q = np.einsum("td,dhk->thk", h, layer["wq"])
        k = np.einsum("td,dhk->thk", h, layer["wk"])
        v = np.einsum("td,dhk->thk", h, layer["wv"])
        if config.qk_norm_position == "before_rope":
            q, k = rope(norm(q, layer["q_norm"])), rope(norm(k, layer["k_norm"]))
        else:
            q, k = norm(rope(q), layer["q_norm"]), norm(rope(k), layer["k_norm"])
        out = np.zeros_like(q)
        for head in range(config.n_heads):
            kv = head // groups
            s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + np.einsum("thk,hkd->td", out, layer["wo"])
        h = norm(x, layer["mlp_norm"])
        gate, up = h @ layer["w_gate"], h @ layer["w_up"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ layer["w_down"]
    return norm(x, p["final_norm"]) @ p["embed"].T


@pytest.mark.parametrize("position", ["before_rope", "after_rope"])
def test_qk_norm_on_either_side_of_rope_matches_a_numpy_transcription(position):
    config = get_size("test-tiny").replace(qk_norm_position=position)
    params = init_params(config, jax.random.PRNGKey(4))
    rng = np.random.default_rng(5)
    for layer in params["layers"]:  # learned, uneven scales: only with these do the orders differ
        layer["q_norm"] = jnp.asarray(rng.uniform(0.3, 2.0, config.head_dim), jnp.float32)
        layer["k_norm"] = jnp.asarray(rng.uniform(0.3, 2.0, config.head_dim), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, 24)))
    ours = np.asarray(logits_fn(params, tokens, config=config))[0]
    want = numpy_logits(params, tokens, config)
    # fp32 against float64: each op rounds at ~6e-8 relative; the longest sums have 192 terms
    # (the FFN) over 2 layers, so logits of size ~1 agree to ~1e-5; 1e-4 leaves a 10x margin
    np.testing.assert_allclose(ours, want, atol=1e-4)
    other = "after_rope" if position == "before_rope" else "before_rope"
    differ = numpy_logits(params, tokens, config.replace(qk_norm_position=other))
    assert np.abs(differ - want).max() > 1e-2, "the two orders must differ with uneven scales"


def test_afm_sizes_use_axlearns_order_and_imports_keep_theirs():
    for name in ("afm-on-device", "afm-server", "afm-tiny"):
        assert get_size(name).qk_norm_position == "after_rope"
    assert get_size("smollm2-135m").qk_norm_position == "before_rope"  # no q/k-norm: unchanged
