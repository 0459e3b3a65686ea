"""Sensitivity analysis on a small random model: the Fisher diagonal against a direct per-window
gradient loop, the measured KL against a float64 numpy computation, the proxy against its
formula, and the on-disk cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.compress import sensitivity
from afmkit.compress.palettize import palettize_matrix
from afmkit.compress.settings import CompressSettings
from afmkit.config import get_size
from afmkit.errors import UserError
from afmkit.files import packaged_data
from afmkit.model.packed import INPUT_AXES
from afmkit.model.transformer import init_params, logits_fn, token_nll

CONFIG = dataclasses.replace(
    get_size("afm-tiny"), name="afm-micro", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128
)
SEQ = 64


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def calibration(smollm2):
    return sensitivity.read_calibration(
        packaged_data("tinyshakespeare/input_head.txt"), smollm2.tokenizer, tokens=4 * SEQ, seq_len=SEQ
    )


def test_calibration_windows_and_refusals(calibration, smollm2, tmp_path):
    assert calibration.windows.shape == (4, SEQ) and calibration.tokens == 4 * SEQ
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be.")
    with pytest.raises(UserError, match="fewer than one window"):
        sensitivity.read_calibration(short, smollm2.tokenizer, tokens=4 * SEQ, seq_len=SEQ)
    with pytest.raises(UserError, match="does not exist"):
        sensitivity.read_calibration(tmp_path / "missing.txt", smollm2.tokenizer)


def test_fisher_is_the_mean_squared_per_window_gradient(params, calibration):
    fisher = sensitivity.fisher_diagonal(CONFIG, params, calibration, batch=3, quiet=True)

    # the same quantity written directly: one gradient of the whole weight tree per window
    def loss(p, row):
        logits = logits_fn(p, row[None], config=CONFIG, activation_dtype=jnp.float32)[0]
        return token_nll(logits[:-1], row[1:])[0].sum()

    grad = jax.jit(jax.grad(loss))
    expected = jax.tree.map(jnp.zeros_like, params)
    for row in calibration.windows:
        expected = jax.tree.map(lambda a, g: a + g * g, expected, grad(params, jnp.asarray(row)))
    scored = calibration.windows.shape[0] * (SEQ - 1)
    assert sorted(fisher) == sorted(sensitivity.matrix_names(params))
    for name, value in fisher.items():
        want = np.asarray(sensitivity.get_matrix(expected, name)) / scored
        # same fp32 gradients through differently fused programs: rounding of sums of ~10^3 terms
        np.testing.assert_allclose(value, want, rtol=1e-3, atol=1e-4 * want.max())
        assert value.shape == sensitivity.get_matrix(params, name).shape and (value >= 0).all()


def palettized(params, name, bits, importance):
    kind = name.rsplit(".", 1)[-1]
    w = np.asarray(sensitivity.get_matrix(params, name))
    return np.asarray(palettize_matrix(w, bits, in_axes=INPUT_AXES[kind], importance=importance).dequantize())


def test_proxy_is_half_the_fisher_weighted_squared_error(params, calibration):
    fisher = sensitivity.fisher_diagonal(CONFIG, params, calibration, quiet=True)
    names = ["layers.0.wq", "layers.1.w_down"]
    proxy = sensitivity.proxy_sensitivity(params, fisher, names=names, extrapolated={}, quiet=True)
    for name in names:
        w = np.asarray(sensitivity.get_matrix(params, name), np.float64)
        for bits in (2, 3, 4, 8):
            q = palettized(params, name, bits, fisher[name])
            assert proxy[name][bits] == pytest.approx(0.5 * np.sum(fisher[name] * (w - q) ** 2), rel=1e-6)
        # fewer bits, larger error: the proxy falls with every added bit
        assert proxy[name][2] > proxy[name][3] > proxy[name][4] > proxy[name][8] >= 0
    # by default 8 bits is not clustered but extrapolated from 4: four more bits, 4^-4 the error
    default = sensitivity.proxy_sensitivity(params, fisher, names=names[:1], quiet=True)[names[0]]
    assert default[8] == default[4] / 256 and default[4] == proxy[names[0]][4]


def test_measured_sensitivity_is_the_kl_to_the_float_model(params, calibration):
    name, bits = "layers.1.w_up", 2
    measured = sensitivity.measured_sensitivity(
        CONFIG, params, calibration, None, names=[name], widths=(bits, 8), measure_tokens=2 * SEQ, quiet=True
    )
    q = palettized(params, name, bits, None)
    layers = list(params["layers"])
    layers[1] = {**layers[1], "w_up": jnp.asarray(q)}
    windows = jnp.asarray(calibration.windows[:2])
    ref = np.asarray(logits_fn(params, windows, config=CONFIG), np.float64)
    new = np.asarray(logits_fn({**params, "layers": layers}, windows, config=CONFIG), np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q_log = log_softmax(ref), log_softmax(new)
    kl = float(np.mean(np.sum(np.exp(p) * (p - q_log), axis=-1)))
    assert kl > 0
    # fp32 logits in the model against float64 here: differences of ~1e-6 nats per position
    assert measured[name][bits] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert measured[name][8] < measured[name][bits]


def test_analysis_is_cached_by_weights_text_and_settings(params, calibration, smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("AFMKIT_CACHE", str(tmp_path / "cache"))
    settings = CompressSettings(seq_len=SEQ, calibration_tokens=4 * SEQ)
    first = sensitivity.analyze(CONFIG, params, calibration, model_name="micro", settings=settings, quiet=True)
    assert set(first.sensitivity) == set(sensitivity.matrix_names(params))
    assert first.fingerprint == sensitivity.model_fingerprint(CONFIG, params)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached analysis should have been used")

    monkeypatch.setattr(sensitivity, "fisher_diagonal", must_not_run)
    again = sensitivity.analyze(CONFIG, params, calibration, model_name="micro", settings=settings, quiet=True)
    assert again.sensitivity == first.sensitivity
    [listed] = sensitivity.find_analyses("micro")
    assert listed.fingerprint == first.fingerprint and listed.sensitivity == first.sensitivity
    assert sensitivity.find_analyses("another-model") == []
    for name, value in again.load_fisher().items():
        np.testing.assert_array_equal(value, first.fisher[name])

    # other text, other weights or another group size: a fresh analysis
    other_text = tmp_path / "other.txt"
    other_text.write_text(packaged_data("tinyshakespeare/input_head.txt").read_text()[5000:])
    other = sensitivity.read_calibration(other_text, smollm2.tokenizer, tokens=4 * SEQ, seq_len=SEQ)
    with pytest.raises(AssertionError, match="cached"):
        sensitivity.analyze(CONFIG, params, other, model_name="micro", settings=settings, quiet=True)
    changed = jax.tree.map(lambda w: w * 1.01, params)
    with pytest.raises(AssertionError, match="cached"):
        sensitivity.analyze(CONFIG, changed, calibration, model_name="micro", settings=settings, quiet=True)
    with pytest.raises(AssertionError, match="cached"):
        sensitivity.analyze(
            CONFIG,
            params,
            calibration,
            model_name="micro",
            settings=dataclasses.replace(settings, group_rows=32),
            quiet=True,
        )


def test_rank_correlation_report():
    proxy = {f"m{i}": {2: float(i), 4: i / 10} for i in range(5)}
    measured = {f"m{i}": {2: float(i) ** 2, 4: (i / 10) ** 2} for i in range(5)}
    report = sensitivity.proxy_vs_measured(proxy, measured)
    assert report["spearman_by_width"] == {2: pytest.approx(1.0), 4: pytest.approx(1.0)}
    assert report["pairs"] == 10
