"""Palettizing a matrix: one k-means table per group of 16 output rows, optional row scales,
importance-weighted clustering; and palettizing a whole model."""

import dataclasses

import jax
import numpy as np
import pytest

from afmkit.compress.kmeans import kmeans1d_optimal
from afmkit.compress.palettize import LAYER_MATRICES, bits_per_weight, palettize_matrix, palettize_params
from afmkit.config import get_size
from afmkit.errors import UserError
from afmkit.model.packed import PackedWeight
from afmkit.model.palettized import PalettizedWeight, dequantize_numpy, unpack_codes
from afmkit.model.transformer import init_params


def _weight(rng, k, n, row_ranges=False):
    w = rng.standard_t(4, size=(k, n)).astype(np.float32) * 0.05
    if row_ranges:  # output rows of very different magnitudes, as in real layers
        w *= np.geomspace(0.1, 10, n).astype(np.float32)[None, :]
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_each_group_of_16_rows_uses_its_own_optimal_table(bits):
    rng = np.random.default_rng(bits)
    w = _weight(rng, 48, 64, row_ranges=True)
    p = palettize_matrix(w, bits)
    assert isinstance(p, PalettizedWeight) and p.tables.shape == (4, 2**bits) and p.scales.shape == (64,)
    scales = np.asarray(p.scales, np.float32)
    np.testing.assert_array_equal(scales, np.abs(w).max(axis=0).astype(np.float16))
    codes = unpack_codes(np.asarray(p.indices), bits, np)
    tables = np.asarray(p.tables, np.float32)
    for g in range(4):
        columns = slice(16 * g, 16 * g + 16)
        # the group's weights, scaled, clustered independently of palettize_matrix's reshapes
        values = (w[:, columns] / scales[columns]).astype(np.float64).reshape(-1)
        centroids, _ = kmeans1d_optimal(values, 2**bits)
        np.testing.assert_allclose(tables[g], centroids.astype(np.float16).astype(np.float32))
        # every weight reads its entry of its own group's table, times its row's scale
        expected = tables[g][codes[:, columns]] * scales[columns]
        np.testing.assert_array_equal(dequantize_numpy(p)[:, columns], expected)


def test_per_row_scale_helps_rows_of_different_ranges_and_more_bits_help():
    rng = np.random.default_rng(0)
    w = _weight(rng, 64, 32, row_ranges=True)
    error = {}
    for bits in (2, 3, 4, 8):
        for scaled in (False, True):
            p = palettize_matrix(w, bits, per_row_scale=scaled)
            assert (p.scales is None) == (not scaled)
            error[bits, scaled] = float(np.square(dequantize_numpy(p) - w).sum())
    # One group whose first 8 rows are 1000x smaller: without a scale the table is spent on the
    # large rows and the small ones collapse onto the entry nearest 0 (relative error ~1); with it
    # they are clustered at their own scale (16 entries: a relative error of a few percent).
    w = _weight(rng, 64, 16)
    w[:, :8] *= 1e-3
    relative = [
        np.square(dequantize_numpy(palettize_matrix(w, 4, per_row_scale=s))[:, :8] - w[:, :8]).sum()
        / np.square(w[:, :8]).sum()
        for s in (False, True)
    ]
    assert relative[0] > 0.5 and relative[1] < 0.1
    for scaled_ in (False, True):
        assert error[2, scaled_] > error[3, scaled_] > error[4, scaled_] > error[8, scaled_]


def test_importance_protects_the_weights_it_marks():
    rng = np.random.default_rng(5)
    w = _weight(rng, 32, 16)
    importance = np.ones_like(w)
    important = rng.random(w.shape) < 0.05
    importance[important] = 1000.0
    plain = dequantize_numpy(palettize_matrix(w, 2, importance=None))
    weighted = dequantize_numpy(palettize_matrix(w, 2, importance=importance))

    def weighted_error(approx):
        return float((importance * np.square(approx - w)).sum())

    # weighted k-means minimises exactly this: it must beat the plain clustering on it
    assert weighted_error(weighted) < weighted_error(plain)
    assert np.square(weighted - w)[important].mean() < np.square(plain - w)[important].mean()


def test_three_dimensional_weights_follow_their_input_axes():
    rng = np.random.default_rng(6)
    wo = rng.normal(size=(4, 8, 32)).astype(np.float32)  # [heads, head_dim, d]: inputs are heads x head_dim
    p = palettize_matrix(wo, 4, in_axes=(0, 1))
    assert p.shape == (4, 8, 32) and (p.k, p.n) == (32, 32)
    np.testing.assert_array_equal(np.asarray(p.dequantize()), dequantize_numpy(p).reshape(4, 8, 32))
    # the same as palettizing the [K, N] matrix
    flat = palettize_matrix(wo.reshape(32, 32), 4)
    np.testing.assert_array_equal(dequantize_numpy(p), dequantize_numpy(flat))


def test_bad_requests_are_refused_in_one_line():
    w = np.ones((32, 32), np.float32)
    for call in (
        lambda: palettize_matrix(w, 5),
        lambda: palettize_matrix(np.ones((30, 32), np.float32), 4),  # inputs not a multiple of 8
        lambda: palettize_matrix(np.ones((32, 24), np.float32), 4),  # outputs not a multiple of 16
        lambda: palettize_matrix(w, 4, group_rows=12),
        lambda: palettize_matrix(w, 4, importance=np.ones((32, 16))),
    ):
        with pytest.raises(UserError) as error:
            call()
        assert "\n" not in str(error.value)


def _small_config():
    """afm-tiny's architecture, narrowed so that palettizing it is quick even in numpy."""
    return dataclasses.replace(
        get_size("afm-tiny"), d_model=64, d_ff=128, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, vocab_size=512
    )


def test_palettize_params_compresses_every_layer_matrix_and_the_embedding():
    config = _small_config()
    params = init_params(config, jax.random.PRNGKey(0))
    bits = {f"layers.{i}.{m}": 2 if m == "w_gate" else 4 for i in range(config.n_layers) for m in LAYER_MATRICES}
    del bits["layers.1.wq"]  # left out: stays fp32
    out = palettize_params(params, bits)
    for i, layer in enumerate(out["layers"]):
        for m in LAYER_MATRICES:
            w = layer[m]
            if (i, m) == (1, "wq"):
                assert not isinstance(w, PalettizedWeight)
                np.testing.assert_array_equal(np.asarray(w), np.asarray(params["layers"][1]["wq"]))
            else:
                assert isinstance(w, PalettizedWeight) and w.bits == bits[f"layers.{i}.{m}"]
                assert w.shape == params["layers"][i][m].shape
        assert not isinstance(layer["attn_norm"], (PalettizedWeight, PackedWeight))
    assert isinstance(out["embed"], PackedWeight) and out["embed"].bits == 8
    assert palettize_params(params, 3, embed_bits=4)["embed"].bits == 4
    # the budget figure: indices plus fp16 tables (16 entries per 16 rows) and scales (one per row)
    uniform = palettize_params(params, 4)
    sizes = [np.prod(params["layers"][i][m].shape) for i in range(config.n_layers) for m in LAYER_MATRICES]
    rows = [
        np.prod(params["layers"][i][m].shape) // uniform["layers"][i][m].k
        for i in range(config.n_layers)
        for m in LAYER_MATRICES
    ]
    expected = (4 * sum(sizes) + sum(16 * (r // 16) * 16 + 16 * r for r in rows)) / sum(sizes)
    assert bits_per_weight(uniform) == pytest.approx(expected)


def test_palettize_params_refuses_unknown_matrices_and_bad_embedding_bits():
    params = init_params(_small_config(), jax.random.PRNGKey(0))
    for call in (
        lambda: palettize_params(params, {"layers.9.wq": 4}),
        lambda: palettize_params(params, {"layers.0.q_proj": 4}),
        lambda: palettize_params(params, 4, embed_bits=6),
        lambda: palettize_params(params, 4, importance={"embed": np.ones(3)}),
    ):
        with pytest.raises(UserError) as error:
            call()
        assert "\n" not in str(error.value)
