"""Optimizers against independent references: AFM's RMSProp-momentum variant against a numpy
transcription of AFM_SPEC section 3, AdamW against Optax's own ``adamw``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from afmkit.errors import UserError
from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule


def toy_params():
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(6, 4)).astype(np.float32), "scale": np.ones(4, np.float32)}


def toy_grads(step):
    rng = np.random.default_rng(100 + step)
    # one block gets a huge gradient on step 1: its update must be clipped to RMS 1
    big = 1e3 if step == 1 else 1.0
    return {"w": (big * rng.normal(size=(6, 4))).astype(np.float32), "scale": rng.normal(size=4).astype(np.float32)}


def run_afmkit(config, steps):
    opt = build_optimizer(config)
    params = jax.tree.map(jnp.asarray, toy_params())
    state = opt.init(params)
    for step in range(steps):
        updates, state = opt.update(jax.tree.map(jnp.asarray, toy_grads(step)), state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params)


def numpy_afm(config, steps):
    """AFM_SPEC section 3, written out by hand in float64."""
    params = {k: v.astype(np.float64) for k, v in toy_params().items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    m = {k: np.zeros_like(p) for k, p in params.items()}
    peak, floor = config.peak_lr, config.final_lr_fraction * config.peak_lr
    for t in range(1, steps + 1):
        grads = {k: g.astype(np.float64) for k, g in toy_grads(t - 1).items()}
        norm = np.sqrt(sum(np.sum(g * g) for g in grads.values()))
        grads = {k: g * min(1.0, 1.0 / norm) for k, g in grads.items()}  # global-norm clip at 1
        step = t - 1
        if step < config.warmup_steps:
            lr = peak * (step + 1) / config.warmup_steps
        else:
            progress = min((step - config.warmup_steps) / (config.total_steps - config.warmup_steps), 1.0)
            lr = floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * progress))
        for k in params:
            v[k] = 0.95 * v[k] + 0.05 * grads[k] ** 2
            v_hat = v[k] / (1 - 0.95**t)
            u = grads[k] / (np.sqrt(v_hat) + config.eps)
            rms = np.sqrt(np.mean(u * u))
            u = u * min(1.0, 1.0 / rms)  # per-block clip to 1
            m[k] = 0.95 * m[k] + 0.05 * u  # EMA, not bias-corrected
            decay = config.weight_decay / peak * params[k] if params[k].ndim > 1 else 0.0
            params[k] = params[k] - lr * (m[k] + decay)
    return params


def test_afm_rmsprop_momentum_matches_hand_computed_reference():
    config = OptimizerConfig(name="afm", peak_lr=0.01, warmup_steps=2, total_steps=6, weight_decay=3.16e-4)
    got = run_afmkit(config, steps=5)
    want = numpy_afm(config, steps=5)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7)
    # the parameters really moved, and decay touched only the matrix
    assert not np.allclose(got["w"], toy_params()["w"])


def test_adamw_matches_optax_adamw_with_decoupled_decay():
    config = OptimizerConfig(name="adamw", peak_lr=3e-3, warmup_steps=2, total_steps=10, weight_decay=0.1)
    got = run_afmkit(config, steps=4)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        # decay / peak: Optax multiplies the decay by the LR, afmkit by the LR's schedule shape only
        optax.adamw(
            lr_schedule(config),
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1 / 3e-3,
            mask=lambda p: {"w": True, "scale": False},
        ),
    )
    params = jax.tree.map(jnp.asarray, toy_params())
    state = reference.init(params)
    for step in range(4):
        updates, state = reference.update(jax.tree.map(jnp.asarray, toy_grads(step)), state, params)
        params = optax.apply_updates(params, updates)
    for k in got:
        np.testing.assert_allclose(got[k], np.asarray(params[k]), rtol=1e-5, atol=1e-7)


def test_schedule_warms_up_then_decays_to_the_floor():
    config = OptimizerConfig(peak_lr=1.0, warmup_steps=10, total_steps=110, final_lr_fraction=0.05)
    schedule = lr_schedule(config)
    values = np.array([float(schedule(s)) for s in range(0, 130)])
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)
    assert np.all(np.diff(values[:10]) > 0) and np.all(np.diff(values[10:110]) <= 1e-7)
    assert values[60] == pytest.approx(0.05 + 0.95 * 0.5, rel=1e-5)  # half-way down the cosine
    assert values[110] == pytest.approx(0.05) and values[129] == pytest.approx(0.05)


def test_bad_optimizer_settings_are_clear_errors():
    with pytest.raises(UserError, match="unknown optimizer 'sgdx'"):
        OptimizerConfig(name="sgdx")
    with pytest.raises(UserError, match="learning rate must be positive"):
        OptimizerConfig(peak_lr=0)


def test_an_extension_replans_a_continuous_cosine_to_the_floor():
    base = OptimizerConfig(peak_lr=1.0, warmup_steps=2, total_steps=10, final_lr_fraction=0.1)
    extended = OptimizerConfig(peak_lr=1.0, warmup_steps=2, total_steps=10, final_lr_fraction=0.1, replans=((6, 16),))
    before, after = lr_schedule(base), lr_schedule(extended)
    for step in range(6):  # the plan before the extension is untouched
        assert float(after(step)) == pytest.approx(float(before(step)))
    begin = float(before(6))
    for step in range(6, 20):  # a cosine from the value at step 6 down to 0.1 at 16, flat after
        progress = min((step - 6) / 10, 1.0)
        assert float(after(step)) == pytest.approx(0.1 + (begin - 0.1) * 0.5 * (1 + np.cos(np.pi * progress)), rel=1e-5)
    with pytest.raises(UserError, match="must start within the previous plan"):
        OptimizerConfig(total_steps=10, replans=((12, 20),))
