"""Int8 activations on palettized weights: the native kernel and the XLA path against a numpy
transcription of the scheme, and the load option on a compressed model.

The scheme (``afmkit.model.palettized``): each row of x to int8 by ``s = max|x| * fp32(1/127)``,
each group's table to int8 by ``t = max|T| * fp32(1/127)``, the products summed in integers, then
``(float(sum) * s) * (t * row_scale)``. Every step is one correctly rounded fp32 operation or exact
integer arithmetic (sums below 2^24 here, so their conversion to fp32 is exact too), so the kernel,
XLA and numpy must agree to the bit, in any batch.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit import kernels
from afmkit.model import palettized as PL

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build afmkit's CPU kernels")


def numpy_int8(x: np.ndarray, codes: np.ndarray, tables: np.ndarray, scales, group_rows: int) -> np.ndarray:
    """The scheme from the weight's codes, tables and scales, in numpy (not the package's unpacking)."""
    f32 = np.float32
    step = f32(1 / 127)
    x_scale = np.abs(x).max(axis=1) * step
    x_scale[x_scale == 0] = 1
    xq = np.clip(np.rint(x / x_scale[:, None]), -127, 127).astype(np.int64)
    tables = tables.astype(f32)
    t_scale = np.abs(tables).max(axis=1) * step
    t_scale[t_scale == 0] = 1
    tq = np.rint(tables / t_scale[:, None]).astype(np.int64)
    group = np.arange(codes.shape[1]) // group_rows
    sums = xq @ tq[group[None, :], codes]
    assert np.abs(sums).max() < 2**24
    col = t_scale[group] if scales is None else t_scale[group] * scales.astype(f32)
    return (sums.astype(f32) * x_scale[:, None]) * col[None, :]


class Weight:
    def __init__(self, bits, k, n, *, group_rows=16, scaled=True, seed=0):
        rng = np.random.default_rng(seed)
        self.codes = rng.integers(0, 2**bits, size=(k, n))
        self.codes[0] = 2**bits - 1
        self.tables = rng.normal(size=(n // group_rows, 2**bits)).astype(np.float16)
        self.scales = rng.uniform(0.5, 2.0, size=n).astype(np.float16) if scaled else None
        self.group_rows = group_rows
        self.leaf = PL.from_codes(self.codes, self.tables, self.scales, bits=bits, shape=(k, n))
        self.int8_leaf = PL.PalettizedWeight(**{**vars(self.leaf), "activation_bits": 8})

    def expected(self, x):
        return numpy_int8(x, self.codes, self.tables, self.scales, self.group_rows)

    def run(self, x):
        return np.asarray(jax.jit(PL.palettized_matmul)(jnp.asarray(x), self.int8_leaf))


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
# Below 64 rows (VNNI code): blocks of 6 rows by pairs of tiles, then the rest as one block; from 64
# rows the weights of 4 tiles at a time are expanded into a buffer first. 208 outputs = 13 tiles (a
# lone tile after the pairs and after the fours); K = 72: 9 blocks of 8 inputs.
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 16, 23, 64, 101])
def test_int8_kernel_matches_numpy_to_the_bit(bits, rows):
    x = np.random.default_rng(rows).normal(size=(rows, 72)).astype(np.float32)
    x[0, :5] *= 40  # one large activation: the row's scale comes from it
    weight = Weight(bits, 72, 208, seed=bits)
    np.testing.assert_array_equal(weight.run(x), weight.expected(x))


@needs_kernels
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int8_kernel_without_scales_tables_of_more_rows_and_zero_rows(bits):
    for group_rows, scaled in ((16, False), (32, True), (64, False)):
        weight = Weight(bits, 576, 192, group_rows=group_rows, scaled=scaled, seed=group_rows)
        x = np.random.default_rng(bits).normal(size=(9, 576)).astype(np.float32)
        x[3] = 0  # an all-zero row: scale 1, result 0
        got = weight.run(x)
        np.testing.assert_array_equal(got, weight.expected(x))
        assert not got[3].any()


@needs_kernels
def test_int8_xla_path_equals_the_kernel_and_a_row_does_not_depend_on_its_batch(monkeypatch):
    weight = Weight(3, 160, 208, seed=3)
    x = np.random.default_rng(4).normal(size=(20, 160)).astype(np.float32)
    native = weight.run(x)
    for rows in (1, 7):
        np.testing.assert_array_equal(weight.run(x[:rows]), native[:rows])
    monkeypatch.setattr(kernels, "on_cpu", lambda: False)
    np.testing.assert_array_equal(weight.run(x), native)


def test_int8_error_against_fp32_stays_within_the_rounding_bound():
    """x = s xq + e with |e| <= s / 2 and T = t tq + f with |f| <= t / 2, so an output moves from the
    fp32 one by at most sum_k (|x_k| t / 2 + s |T_k| / 2 + s t / 4) |scale| (plus fp32 rounding)."""
    weight = Weight(4, 96, 64, seed=7)
    x = np.random.default_rng(8).normal(size=(5, 96)).astype(np.float32)
    exact = x.astype(np.float64) @ PL.dequantize_numpy(weight.leaf).astype(np.float64)
    s = np.abs(x).max(1, keepdims=True) / 127
    t = np.abs(weight.tables.astype(np.float64)).max(1) / 127
    group = np.arange(64) // 16
    table_abs = np.abs(weight.tables.astype(np.float64))[group[None, :], weight.codes]  # |T| [K, N]
    scale = np.abs(weight.scales.astype(np.float64))
    bound = (np.abs(x) @ np.ones((96, 64)) * t[group] / 2 + s * (table_abs.sum(0) / 2) + 96 * s * t[group] / 4) * scale
    error = np.abs(weight.run(x) - exact)
    assert np.all(error <= bound * (1 + 1e-5) + 1e-6)
    assert error.max() > 0  # it does quantize


def test_gradients_pass_straight_through_to_the_fp32_matmul():
    weight = Weight(2, 64, 32, seed=9)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32))

    def loss(w):
        return lambda x: jnp.sum(PL.palettized_matmul(x, w) ** 2)

    def grad(w, y):  # d/dx sum(y^2) = 2 y W^T, with y the int8 forward's output
        return 2 * np.asarray(y, np.float64) @ PL.dequantize_numpy(w.leaf).astype(np.float64).T

    y = weight.run(np.asarray(x))
    got = np.asarray(jax.grad(loss(weight.int8_leaf))(x), np.float64)
    np.testing.assert_allclose(got, grad(weight, y), rtol=1e-4, atol=1e-4)


# Slow (CI runs it when time allows): a child pytest that rebuilds the kernels with other ISA flags.
@pytest.mark.slow
@needs_kernels
def test_int8_portable_code_for_cpus_without_vnni(tmp_path):
    """The portable integer code (this machine may otherwise build the VNNI one) gives the same bits."""
    env = {**os.environ, "AFMKIT_KERNEL_FLAGS": "-mno-avx512vnni", "AFMKIT_CACHE": str(tmp_path)}
    code = "from afmkit import kernels; kernels.available(); print(kernels.palettized_int8_isa())"
    isa = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert isa.stdout.strip() == "portable", isa.stdout + isa.stderr[-2000:]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", __file__, "-k", "to_the_bit or zero_rows or batch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-1000:]
