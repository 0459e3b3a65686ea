"""Indices chosen with GPTQ's error feedback (``afmkit.compress.gptq``): the same codes as a
float64 transcription of the paper's algorithm (the inverse Hessian updated by elimination, no
Cholesky), nearest-value codes when inputs are uncorrelated, a lower layer-output error than
nearest-value codes on correlated inputs, and input statistics equal to the layer inputs computed
by hand."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import afmkit
from afmkit.cli import main
from afmkit.compress.cli import REPORT_FILE, check_settings
from afmkit.compress.gptq import DAMP, InputGrams, assign_codes, output_error
from afmkit.compress.palettize import palettize_matrix
from afmkit.compress.settings import CompressSettings
from afmkit.config import get_size
from afmkit.errors import UserError
from afmkit.files import packaged_data
from afmkit.interop import native
from afmkit.model.palettized import dequantize_numpy
from afmkit.model.transformer import init_params

CONFIG = dataclasses.replace(
    get_size("afm-tiny"), name="afm-micro", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128
)


def _correlated_inputs(rng, tokens, k):
    """Inputs whose features mix a few shared directions, as a layer's inputs do."""
    mixing = rng.standard_normal((8, k)) * 3 + rng.standard_normal((k, k))[:8]
    return rng.standard_normal((tokens, 8)) @ mixing + 0.3 * rng.standard_normal((tokens, k))


def _gptq_by_elimination(w, grid, gram, damp):
    """GPTQ's Algorithm 1 (Frantar et al. 2022) without its Cholesky reformulation: round the
    rows in order of decreasing H[k, k]; after each, move the later rows by the error times the
    current inverse Hessian's row, then remove the rounded input from the inverse (Gaussian
    elimination, the OBS update)."""
    k, n = w.shape
    order = np.argsort(-np.diag(gram), kind="stable")
    w, h = w[order].astype(np.float64), gram[np.ix_(order, order)].astype(np.float64)
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    codes = np.zeros((k, n), np.int64)
    for i in range(k):
        codes[i] = [np.argmin(np.abs(w[i, j] - grid[j])) for j in range(n)]
        error = (w[i] - grid[np.arange(n), codes[i]]) / hinv[i, i]
        w[i + 1 :] -= np.outer(hinv[i, i + 1 :], error)
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    out = np.empty_like(codes)
    out[order] = codes
    return out


def test_codes_equal_a_transcription_of_the_published_algorithm():
    rng = np.random.default_rng(0)
    k, n, levels = 200, 12, 4  # more rows than one block: the between-block update is exercised
    x = _correlated_inputs(rng, 500, k)
    gram = x.T @ x / len(x)
    w = rng.standard_normal((k, n)) * 0.1
    grid = np.sort(rng.standard_normal((n, levels)) * 0.1, axis=1)
    np.testing.assert_array_equal(assign_codes(w, grid, gram, damp=DAMP), _gptq_by_elimination(w, grid, gram, DAMP))


def test_uncorrelated_inputs_give_the_nearest_table_entries():
    # With a diagonal Gram matrix one input's error cannot be cancelled by another's.
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32) * 0.05
    gram = np.diag(rng.uniform(0.5, 2.0, 64))
    nearest, fed_back = palettize_matrix(w, 3), palettize_matrix(w, 3, gram=gram)
    np.testing.assert_array_equal(np.asarray(nearest.indices), np.asarray(fed_back.indices))
    np.testing.assert_array_equal(np.asarray(nearest.tables), np.asarray(fed_back.tables))


@pytest.mark.parametrize("bits", [2, 4])
def test_error_feedback_lowers_the_layer_output_error(bits):
    rng = np.random.default_rng(bits)
    x = _correlated_inputs(rng, 2000, 128)
    gram = x.T @ x / len(x)
    w = (rng.standard_t(4, size=(128, 64)) * 0.05).astype(np.float32)
    nearest = dequantize_numpy(palettize_matrix(w, bits))
    fed_back = palettize_matrix(w, bits, gram=gram)
    # the same tables and scales, other indices
    np.testing.assert_array_equal(np.asarray(fed_back.tables), np.asarray(palettize_matrix(w, bits).tables))
    # Inputs of 8 strong shared directions: the feedback cancels nearly all their error (about 2%
    # of nearest's here, float64 on a fixed seed), so a tenth leaves a wide margin on any CPU.
    assert output_error(w, dequantize_numpy(fed_back), gram) < 0.1 * output_error(w, nearest, gram)
    # the output error, measured on the inputs themselves, agrees with the Gram form
    diff = w.astype(np.float64) - dequantize_numpy(fed_back).astype(np.float64)
    direct = np.mean(np.sum(np.square(x @ diff), axis=1))
    assert direct == pytest.approx(output_error(w, dequantize_numpy(fed_back), gram), rel=1e-9)


def test_a_gram_matrix_of_the_wrong_size_is_refused_in_one_line():
    w = np.ones((32, 16), np.float32)
    with pytest.raises(UserError, match=r"has shape \(16, 16\); this weight has 32 inputs"):
        palettize_matrix(w, 2, gram=np.eye(16))
    # settings made in code (Talaria, scripts) are checked too, not read as "nearest"
    with pytest.raises(UserError, match="--codes must be one of nearest, gptq, not 'GPTQ'"):
        check_settings(CompressSettings(bits_per_weight=3.5, calibration="c.txt", out="o", codes="GPTQ"))


def test_input_grams_are_the_layer_inputs_second_moments():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    windows = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 16)).astype(np.int32)
    grams = InputGrams(CONFIG, params, windows, quiet=True)
    assert grams.layers_per_pass == CONFIG.n_layers
    d, hidden = CONFIG.d_model, CONFIG.n_heads * CONFIG.head_dim
    expected_sizes = {"attention_in": d, "attention_out": hidden, "mlp_in": d, "mlp_hidden": CONFIG.d_ff}
    assert set(grams) == {f"layers.{i}.{kind}" for i in range(CONFIG.n_layers) for kind in expected_sizes}
    for name, gram in grams.items():
        size = expected_sizes[name.rpartition(".")[2]]
        assert gram.shape == (size, size)
        np.testing.assert_allclose(gram, gram.T, rtol=0, atol=1e-6 * np.abs(gram).max())
    # layer 0 reads the normalised embeddings: computed here by hand in float64
    e = np.asarray(params["embed"], np.float64)[windows.reshape(-1)]
    normed = e / np.sqrt(np.mean(e * e, axis=1, keepdims=True) + CONFIG.norm_eps)
    x = normed * np.asarray(params["layers"][0]["attn_norm"], np.float64)
    # fp32 products summed over 48 tokens: a few fp32 ulps of the largest entry
    np.testing.assert_allclose(grams["layers.0.attention_in"], x.T @ x / len(x), rtol=1e-5, atol=1e-6)
    assert np.isfinite(grams["layers.1.mlp_hidden"]).all()
    # a layer per pass (a model too big for one): the same statistics, and only one layer's kept
    one_layer = 4 * sum(k * k for k in expected_sizes.values())
    by_layer = InputGrams(CONFIG, params, windows, max_bytes=one_layer, quiet=True)
    assert by_layer.layers_per_pass == 1
    for name in grams:  # in palettize_params' order
        np.testing.assert_allclose(by_layer[name], grams[name], rtol=1e-5, atol=1e-6 * np.abs(grams[name]).max())
        assert len(by_layer._kept) == 4


def test_compress_with_gptq_codes_end_to_end(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("AFMKIT_CACHE", str(tmp_path / "cache"))
    native.save_checkpoint(tmp_path / "float", CONFIG, init_params(CONFIG, jax.random.PRNGKey(3)), smollm2.tokenizer)
    calibration = ["--calibration", str(packaged_data("tinyshakespeare/input_head.txt"))]
    common = [*calibration, "--calibration-tokens", "256", "--seq-len", "64", "--bits-per-weight", "3", "--quiet"]
    for codes in ("nearest", "gptq"):
        argv = ["--model", tmp_path / "float", *common, "--codes", codes, "--out", tmp_path / codes]
        assert main(["compress", "palettize", *map(str, argv)]) == 0
    reports = {c: json.loads((tmp_path / c / REPORT_FILE).read_text()) for c in ("nearest", "gptq")}
    assert reports["gptq"]["codes"] == "gptq" and "input_statistics" in reports["gptq"]["seconds"]
    assert reports["gptq"]["bits_per_weight"] == reports["nearest"]["bits_per_weight"]
    nearest, gptq = afmkit.load(tmp_path / "nearest"), afmkit.load(tmp_path / "gptq")
    a, b = nearest.params["layers"][0]["w_up"], gptq.params["layers"][0]["w_up"]
    np.testing.assert_array_equal(np.asarray(a.tables), np.asarray(b.tables))
    assert (np.asarray(a.codes()) != np.asarray(b.codes())).any()
    assert np.isfinite(gptq.logits(gptq.tokenizer.encode("To be, or not to be"))).all()
