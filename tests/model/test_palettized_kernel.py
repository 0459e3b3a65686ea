"""The native kernel for palettized (look-up-table) weights, checked against numpy in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit import kernels
from afmkit.model import palettized as PL
from afmkit.model.palettized import from_codes

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build afmkit's CPU kernels")

_kernel = jax.jit(kernels.palettized_matmul, static_argnames=("bits", "bf16"))


def to_bf16(a: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


class Weight:
    """A random palettized weight, with what the kernel should compute built from its codes, tables
    and scales directly in float64 (not through the package's own unpacking)."""

    def __init__(self, bits, k, n, *, group_rows=16, scaled=True, seed=0):
        rng = np.random.default_rng(seed)
        self.codes = rng.integers(0, 2**bits, size=(k, n))
        self.codes[0] = 2**bits - 1  # every bit of some words set
        self.tables = rng.normal(size=(n // group_rows, 2**bits)).astype(np.float16)
        self.scales = rng.uniform(0.5, 2.0, size=n).astype(np.float16) if scaled else None
        self.group_rows = group_rows
        self.leaf = from_codes(self.codes, self.tables, self.scales, bits=bits, shape=(k, n))

    def exact(self, rounded: bool = False):
        """W in float64; ``rounded``: the table entries rounded to bf16, as the kernel's bf16 path does."""
        tables = to_bf16(self.tables) if rounded else self.tables
        w = tables.astype(np.float64)[np.arange(self.codes.shape[1])[None, :] // self.group_rows, self.codes]
        return w if self.scales is None else w * self.scales.astype(np.float64)[None, :]

    def check(self, x, bf16=False):
        """The kernel's result on x, within fp32 accumulation of the exact one: K products summed in
        two chains, then their sum and the scale, each output within (K + 2) units of fp32 rounding
        (2^-24) of sum |x w| (the standard dot-product bound). With ``bf16`` on a CPU with
        AVX512-BF16, the exact products are those of x and the table entries rounded to bf16."""
        rounded = bf16 and kernels.has_bf16()
        x64 = (to_bf16(x) if rounded else x).astype(np.float64)
        w = self.exact(rounded)
        got = np.asarray(
            _kernel(
                jnp.asarray(x), self.leaf.indices, self.leaf.tables, self.leaf.scales, bits=self.leaf.bits, bf16=bf16
            )
        )
        bound = (x.shape[1] + 2) * 2.0**-24 * (np.abs(x64) @ np.abs(w)) + 1e-30
        assert np.all(np.abs(got - x64 @ w) <= bound), np.abs(got - x64 @ w).max()
        return got


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
# The AVX-512 fp32 kernel takes rows 6 at a time, then the rest 2 or 1 at a time, over pairs of
# tiles; the bf16 one (AVX512-BF16) up to 4 rows (2 where AMX's tiles run) straight from the codes,
# 2 or 1 at a time, and more rows through an expanded buffer, 6 rows by 4 tiles, then single rows
# (or AMX's tiles). 1-101 rows and 208 outputs (13 tiles: a lone tile after the pairs and after the
# fours) cover every remainder; K = 72 is 9 blocks of 8 (odd).
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 16, 17, 63, 64, 101])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_kernel_matches_numpy(bits, rows, bf16):
    x = np.random.default_rng(rows).normal(size=(rows, 72)).astype(np.float32)
    Weight(bits, 72, 208, seed=bits).check(x, bf16)


@needs_kernels
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernel_without_scales_and_with_tables_of_32_rows(bits):
    for group_rows, scaled in ((16, False), (32, True), (64, False)):
        weight = Weight(bits, 576, 192, group_rows=group_rows, scaled=scaled, seed=group_rows)
        for rows in (9, 70):
            for bf16 in (False, True):
                weight.check(np.random.default_rng(rows).normal(size=(rows, 576)).astype(np.float32), bf16)


@needs_kernels
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_row_gives_the_same_bits_in_any_batch(bits, bf16):
    """Decode batches grow and shrink, and prefill shares steps with them: a request's logits must
    not depend on who shares its batch, from one row to prefill sizes (the bf16 path reads the codes
    directly up to 4 rows, 2 where AMX's tiles run, and through an expanded buffer above)."""
    weight = Weight(bits, 160, 208, seed=3)
    x = np.random.default_rng(4).normal(size=(200, 160)).astype(np.float32)
    alone = np.concatenate([weight.check(x[i : i + 1], bf16) for i in range(0, 200, 9)])
    for rows in (2, 3, 4, 5, 7, 16, 63, 64, 131, 200):
        np.testing.assert_array_equal(weight.check(x[:rows], bf16)[::9], alone[: len(range(0, rows, 9))])


def bf16_sums(x, w, arithmetic):
    """A float32 numpy transcription of the bf16 path's sums (x and w already bf16 values, so every
    product is exact in fp32 and each addition rounds once), as Intel's SDM gives the instructions:
    ``pairs`` is VDPBF16PS, one sum per output adding each pair's odd then even product; ``amx`` is
    TDPBF16PS, per block of 32 inputs an even and an odd sum from zero, then total + (even + odd)."""
    f32 = np.float32
    x, w = x.astype(f32), w.astype(f32)
    total = np.zeros((x.shape[0], w.shape[1]), f32)
    if arithmetic == "pairs":
        for k in range(0, x.shape[1], 2):
            total = total + x[:, k + 1, None] * w[None, k + 1]
            total = total + x[:, k, None] * w[None, k]
        return total
    for block in range(0, x.shape[1], 32):
        even, odd = np.zeros_like(total), np.zeros_like(total)
        for k in range(block, min(block + 32, x.shape[1]), 2):
            even = even + x[:, k, None] * w[None, k]
            odd = odd + x[:, k + 1, None] * w[None, k + 1]
        total = total + (even + odd)
    return total


needs_bf16 = pytest.mark.skipif(not kernels.has_bf16(), reason="the CPU has no AVX512-BF16: no bf16 path")


@needs_kernels
@needs_bf16
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bf16_sums_are_the_instructions_own_bit_for_bit(bits):
    """Every row count of the bf16 path (direct from the codes up to 4 rows, 2 where AMX's tiles
    run; above that the expanded buffer, on AMX's tiles where the CPU has them) equals the
    transcription of the instructions' arithmetic exactly: AMX's blocked sums on CPUs with AMX,
    with or without the tiles, else vdpbf16ps's chain. K = 1,112 is 34 blocks of 32 and a short one
    of 24."""
    arithmetic = kernels.bf16_arithmetic()
    transcription = "amx" if arithmetic.startswith("amx") else "pairs"
    weight = Weight(bits, 1112, 48, seed=bits)
    x = np.random.default_rng(bits).normal(size=(101, 1112)).astype(np.float32)
    w = to_bf16(weight.tables).astype(np.float32)[np.arange(48)[None, :] // 16, weight.codes]
    want = bf16_sums(to_bf16(x), w, transcription) * weight.scales.astype(np.float32)
    for rows in (1, 2, 3, 4, 5, 16, 17, 33, 101):
        got = np.asarray(
            _kernel(
                jnp.asarray(x[:rows]), weight.leaf.indices, weight.leaf.tables, weight.leaf.scales, bits=bits, bf16=True
            )
        )
        np.testing.assert_array_equal(got, want[:rows], err_msg=f"{rows} rows, {arithmetic}")


@needs_kernels
@pytest.mark.skipif(
    kernels.bf16_arithmetic() != "amx", reason="the CPU has no AMX tiles (or the OS did not grant them)"
)
def test_without_amx_tiles_the_same_bits(child_pytest):
    """The checked fallback: with the tiles refused (AFMKIT_AMX=0, as on a system that does not grant
    them) every path emulates AMX's sums, so the bits match the transcription, and the tiles', too."""
    child_pytest({"AFMKIT_AMX": "0"}, "bit_for_bit or any_batch or describe")


@needs_kernels
def test_describe_says_whether_amx_tiles_ran():
    """Benchmarks record ``kernels.describe()`` beside their timings: it names the build's ISA and,
    on CPUs with AMX, whether batches ran on the tiles or only took their sums."""
    described, arithmetic = kernels.describe(), kernels.bf16_arithmetic()
    assert described.startswith("native ")
    if arithmetic.startswith("amx"):
        assert described.endswith(f", {arithmetic}"), described
    else:
        assert "amx" not in described, described


@needs_kernels
def test_linear_uses_the_kernel_and_agrees_with_xla_values_and_gradients(monkeypatch):
    """CPUs multiply through the kernel, accelerators through XLA: the same numbers (to the kernel's
    rounding) and the same gradients to the input, the tables and the scales."""
    spec = Weight(3, 96, 64, seed=5)
    weight = spec.leaf
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 96)).astype(np.float32))

    def loss(x, tables, scales):
        w = PL.PalettizedWeight(weight.indices, tables, scales, weight.bits, weight.shape, weight.in_axes)
        return jnp.sum(jnp.sin(PL.palettized_linear(x, w)))

    native_value, native_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, weight.tables, weight.scales)
    monkeypatch.setattr(kernels, "on_cpu", lambda: False)
    xla_value, xla_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, weight.tables, weight.scales)

    # How far an output y may move: bf16 rounding of x and of the table entries (2^-8 relative each,
    # so 2^-7 + 2^-16 for their product) where the kernel rounds, plus fp32 accumulation on both paths.
    rows = np.abs(np.asarray(x, np.float64)).reshape(-1, 96)
    w = np.abs(spec.exact())
    moved = (2.0**-7 + 2.0**-16 if kernels.has_bf16() else 0) + 2 * (96 + 2) * 2.0**-24
    dy = moved * (rows @ w)  # [rows, N]
    # sin and cos move by at most |dy|; the backward pass is XLA's on both paths, the input's
    # gradient with cos(y) and W rounded to bf16 on the kernel's path where the CPU has AVX512-BF16
    assert abs(float(native_value) - float(xla_value)) <= dy.sum()
    scales = np.abs(spec.scales.astype(np.float64))
    unscaled = w / scales[None, :]
    backward = (2.0**-7 + 2.0**-16 if kernels.has_bf16() else 0) * w.sum(1)[None, :]  # |cos| <= 1
    bounds = [
        (dy @ w.T + backward).reshape(x.shape),  # d/dx = cos(y) W^T
        # d/dtable[g, e]: x_k cos(y_n) scale_n summed over the weights of group g using entry e
        np.broadcast_to((rows.sum(1) @ (dy * scales[None, :]).reshape(len(rows), -1, 16).sum(2))[:, None], (4, 8)),
        ((rows @ unscaled) * dy).sum(0),  # d/dscale_n: x_k table(k, n) cos(y_n)
    ]
    for native, xla, bound in zip(native_grads, xla_grads, bounds):
        native, xla = np.asarray(native, np.float64), np.asarray(xla, np.float64)
        # the table and scale gradients are fp16: each rounded to 2^-11 of itself (or to fp16's
        # subnormal spacing, 2^-24) on both paths
        assert np.all(np.abs(native - xla) <= bound + 2.0**-10 * np.abs(xla) + 2.0**-23)


# Slow (CI runs it when time allows): a child pytest that rebuilds the kernels with other ISA flags.
@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize(
    "flags",
    ["-mno-avx512vbmi", "-mno-avx512vbmi -mno-avx512bf16", "-mno-avx512f", "-mno-avx512f -mno-avx2 -mno-fma"],
    ids=["avx512-bf16-no-vbmi", "avx512-fp32-no-vbmi", "avx2", "portable"],
)
def test_kernel_built_for_cpus_without_avx512(flags, tmp_path, child_pytest):
    """The AVX-512 code without byte permutes (with bf16 dot products where the CPU has them, and
    without), the AVX2 and the plain C++ code of the kernel (this machine may otherwise build
    another) pass this file's numpy and batch tests too."""
    if flags == "-mno-avx512vbmi" and not kernels.has_bf16():
        pytest.skip("without AVX512-BF16 this build is the fp32 one without byte permutes")
    env = {"AFMKIT_KERNEL_FLAGS": flags, "AFMKIT_CACHE": str(tmp_path)}
    child_pytest(env, "matches_numpy or without_scales or any_batch")
    assert list(tmp_path.glob("kernels/palettized_kernels-*.so")), "the kernel was not rebuilt with the flags"


@pytest.mark.slow
@needs_kernels
@needs_bf16
@pytest.mark.parametrize(
    "flags", ["-mamx-tile -mamx-bf16", "-mno-amx-tile -mno-amx-bf16"], ids=["amx-arithmetic", "pairs-arithmetic"]
)
def test_kernel_built_with_and_without_amx(flags, tmp_path, child_pytest):
    """Both arithmetics of the bf16 path on any CPU with AVX512-BF16: built for AMX (where the CPU
    has no tiles, every path emulates their sums) and built without it (vdpbf16ps's chain), each
    bit for bit against its transcription and batch-invariant."""
    env = {"AFMKIT_KERNEL_FLAGS": flags, "AFMKIT_CACHE": str(tmp_path)}
    child_pytest(env, "matches_numpy or any_batch or bit_for_bit")
    assert list(tmp_path.glob("kernels/palettized_kernels-*.so")), "the kernel was not rebuilt with the flags"
