"""Packed 4/8-bit weights and the native CPU kernels, checked against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit import kernels
from afmkit.config import get_size
from afmkit.errors import UserError
from afmkit.model import packed as P
from afmkit.model.kv_cache import KVCache
from afmkit.model.transformer import forward, init_params, output_logits

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build afmkit's CPU kernels")
RNG = np.random.default_rng(0)


def bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_stays_within_half_a_step_and_repacking_is_lossless(bits):
    w = RNG.standard_normal((96, 48)).astype(np.float32)
    packed = P.pack(w, bits)
    dequantized = P.unpack_numpy(packed)
    blocks = w.reshape(3, 32, 48)
    step = (blocks.max(1) - blocks.min(1)) / 15 if bits == 4 else np.abs(blocks).max(1) / 127
    assert np.all(np.abs(dequantized - w).reshape(3, 32, 48) <= step[:, None] * 0.5 + 1e-3 * step[:, None])
    # numpy and jnp unpacking agree, and packing already-quantized weights gives them back exactly
    np.testing.assert_array_equal(np.asarray(packed.matrix()), dequantized)
    np.testing.assert_array_equal(P.unpack_numpy(P.pack(dequantized, bits)), dequantized)


def test_dequantize_and_rows_follow_the_logical_layout():
    wo = RNG.standard_normal((4, 16, 64)).astype(np.float32)  # [heads, head_dim, d]: contracts 2 axes
    packed = P.pack(wo, 8, (0, 1))
    assert packed.k == 64 and packed.n == 64
    np.testing.assert_allclose(np.asarray(packed.dequantize()), wo, atol=np.abs(wo).max() / 127)
    embed = RNG.standard_normal((48, 64)).astype(np.float32)  # [vocab, d]: contracts d
    table = P.pack(embed, 8, (1,))
    tokens = jnp.asarray([[3, 47, 0], [16, 17, 31]])
    np.testing.assert_array_equal(np.asarray(table.rows(tokens)), np.asarray(table.dequantize())[np.asarray(tokens)])


def test_unpackable_shapes_and_bad_bits_are_refused():
    with pytest.raises(UserError, match="multiple of 32"):
        P.pack(np.ones((40, 32), np.float32), 4)
    with pytest.raises(UserError, match="4 or 8 bits"):
        P.pack(np.ones((32, 32), np.float32), 3)
    # a shape that does not tile is left unpacked by pack_params, not refused
    assert not isinstance(P.pack_leaf("layers.0.wq", np.ones((40, 2, 8), np.float32), bits=4), P.PackedWeight)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
# From 128 rows on (AVX-512; 16 on AVX2 and portable builds) the kernel takes its prefill path, a
# GEMM over weights expanded once, up to 1024 rows (prompts are prefilled in chunks of 512); 17,
# 130, 131, 201 and 517 rows leave remainders of its row blocks (3 or 4 rows), and 208 outputs
# (13 tiles) one of its tile groups.
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 17, 64, 130, 131, 201, 256, 517, 1024])
def test_kernel_matches_numpy_in_fp32_and_bf16(bits, rows):
    w = RNG.standard_normal((576, 208)).astype(np.float32)
    packed = P.pack(w, bits)
    exact = P.unpack_numpy(packed).astype(np.float64)
    x = RNG.standard_normal((rows, 576)).astype(np.float32)
    run = jax.jit(kernels.packed_matmul, static_argnames=("bits", "n", "bf16"))
    y32 = np.asarray(run(jnp.asarray(x), packed.packed, packed.scales, bits=bits, n=208, bf16=False))
    np.testing.assert_allclose(y32, x @ exact, rtol=0, atol=2e-5 * np.abs(x @ exact).max())
    if kernels.has_bf16():
        y16 = np.asarray(run(jnp.asarray(x), packed.packed, packed.scales, bits=bits, n=208, bf16=True))
        # only x is rounded: to within fp32 accumulation of the bf16-rounded x times exact weights
        # (the offsets of 4-bit blocks multiply the exact sums of x, hence the looser bound there)
        reference = bf16(x) @ exact
        bound = (1e-5 if bits == 8 else 3e-3) * np.abs(reference).max()
        np.testing.assert_allclose(y16, reference, rtol=0, atol=bound)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_gives_the_same_bits_whatever_its_batch(bits):
    """Prefill-sized batches (128 rows or more on AVX-512, 16 on AVX2 and portable builds, 5 on
    AMX's tiles where the CPU has them) take the kernel's GEMM path, small ones its row kernel: a
    row must come out bit for bit the same either way and whatever its place in a prefill chunk
    (1552 outputs: 97 tiles, a remainder of the GEMM's tile groups). On CPUs with AMX the row
    kernel computes AMX's sums with vdpbf16ps, so this compares two implementations bit for bit;
    4 and 5 rows sit either side of the tiles' threshold."""
    packed = P.pack(RNG.standard_normal((576, 1552)).astype(np.float32), bits)
    x = jnp.asarray(RNG.standard_normal((600, 576)), jnp.float32)
    matmul = jax.jit(lambda x, w: P.packed_matmul(x, w))
    whole = np.asarray(matmul(x, packed))
    for start, stop in [
        (0, 1),
        (5, 7),
        (40, 44),
        (50, 55),
        (3, 19),
        (20, 37),
        (1, 131),
        (19, 150),
        (0, 256),
        (77, 589),
    ]:
        np.testing.assert_array_equal(np.asarray(matmul(x[start:stop], packed)), whole[start:stop])


@needs_kernels
def test_gradient_reaches_the_input_through_the_kernel():
    packed = P.pack(RNG.standard_normal((64, 32)).astype(np.float32), 4)
    weights = jnp.asarray(P.unpack_numpy(packed))
    x = jnp.asarray(RNG.standard_normal((5, 64)), jnp.float32)
    probe = jnp.arange(32.0)
    grad = jax.grad(lambda x: jnp.sum(P.packed_matmul(x, packed) * probe))(x)
    w = np.asarray(weights, np.float64)
    expected = np.broadcast_to(np.asarray(probe, np.float64) @ w.T, x.shape)
    # Where the CPU has AVX512-BF16 the gradient rounds both factors to bf16 (2^-8 relative each,
    # 2^-7 + 2^-16 for their product); fp32 sums over the 32 outputs add 32 * 2^-24 of sum |g w|.
    rounding = (2.0**-7 + 2.0**-16 if kernels.has_bf16() else 0.0) + 32 * 2.0**-24
    bound = rounding * (np.arange(32.0) @ np.abs(w).T)
    assert np.all(np.abs(np.asarray(grad, np.float64) - expected) <= bound)


@needs_kernels
@pytest.mark.skipif(not kernels.has_bf16(), reason="the CPU has no AVX512-BF16")
def test_training_multiplies_the_input_gradient_in_bf16():
    """Training on a quantized base is bound by the input gradients' matmuls: XLA must run them as
    bf16 dots (2-3x fp32's rate here), not round to bf16 and multiply in fp32, which it does for a
    weight laid out transposed. Packed and palettized alike."""
    import re

    from afmkit.compress.palettize import palettize_matrix
    from afmkit.model import palettized as PL

    w = RNG.standard_normal((64, 48)).astype(np.float32)
    x = jnp.asarray(RNG.standard_normal((32, 64)), jnp.float32)
    for leaf, matmul in ((P.pack(w, 4), P.packed_matmul), (palettize_matrix(w, 4), PL.palettized_matmul)):
        grad = jax.jit(jax.grad(lambda x, leaf, matmul=matmul: jnp.sum(jnp.sin(matmul(x, leaf)))))
        program = grad.lower(x, leaf).compile().as_text()
        dots = [m.group(1) for m in re.finditer(r"\n\s*(?:ROOT )?%\S+ = \S+ dot\(%([^,]+),", program)]
        operand_types = {
            re.search(rf"%{re.escape(name)}[^\n]*? = (\w+)\[|%{re.escape(name)}: (\w+)\[", program).group(0)
            for name in dots
        }
        assert dots and all("bf16" in t for t in operand_types), (type(leaf).__name__, operand_types)


@needs_kernels
def test_without_bf16_a_prefill_chunk_goes_through_the_kernels_fp32_gemm(monkeypatch):
    """Without AVX512-BF16 (or when it is not used) a 512-row prefill chunk is multiplied by the
    kernel's fp32 GEMM, not dequantized for XLA: the same bits as the kernel called directly,
    and numpy's product to fp32 rounding."""
    monkeypatch.setattr(kernels, "has_bf16", lambda: False)
    packed = P.pack(RNG.standard_normal((576, 64)).astype(np.float32), 4)
    x = RNG.standard_normal((512, 576)).astype(np.float32)
    y = np.asarray(jax.jit(lambda x, w: P.packed_matmul(x, w))(jnp.asarray(x), packed))
    native = kernels.packed_matmul(jnp.asarray(x), packed.packed, packed.scales, bits=4, n=packed.n, bf16=False)
    np.testing.assert_array_equal(y, np.asarray(native))
    exact = x @ P.unpack_numpy(packed).astype(np.float64)
    # fp32 rounding of 576 products summed in two chains grows like sqrt(K) * 2^-24 * |x w| (about
    # 1e-6 of the largest output); a wrong code, scale or lost block of K errs by 1e-2 or more
    np.testing.assert_allclose(y, exact, rtol=0, atol=2e-5 * np.abs(exact).max())


def test_without_kernels_packed_weights_go_through_xla(monkeypatch):
    packed = P.pack(RNG.standard_normal((64, 32)).astype(np.float32), 4)
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    monkeypatch.setattr(kernels, "on_cpu", lambda: False)
    y = np.asarray(jax.jit(P.packed_matmul)(jnp.asarray(x), packed))
    np.testing.assert_allclose(y, x @ P.unpack_numpy(packed), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("groups", [1, 3, 5])
def test_decode_attention_reads_only_each_rows_visible_positions(groups):
    batch, kv, dim, capacity = 4, 2, 32, 70
    q = RNG.standard_normal((batch, kv, groups, dim)).astype(np.float32)
    keys = RNG.standard_normal((batch + 2, kv, dim, capacity)).astype(np.float32)  # cache has spare rows
    values = RNG.standard_normal((batch + 2, kv, capacity, dim)).astype(np.float32)
    lengths = np.array([1, 17, 33, 70], np.int32)
    got = np.asarray(
        jax.jit(kernels.decode_attention, static_argnames="scale")(
            jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(lengths), scale=0.2
        )
    )
    for b, n in enumerate(lengths):
        scores = np.einsum("kgd,kds->kgs", q[b], keys[b, :, :, :n]) * 0.2
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(got[b], np.einsum("kgs,ksd->kgd", probs, values[b, :, :n]), atol=2e-6)


def _decode_logits(params, config, tokens, *, steps):
    """Prefill ``tokens`` (one row per prompt), then greedy-decode ``steps`` tokens one at a time."""
    batch, length = tokens.shape
    cache = KVCache.zeros(config, batch=batch, capacity=64)
    step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, c, config=config, attend_len=64))
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    hidden, cache = step(params, tokens, positions, cache)
    logits = [output_logits(params, hidden[:, -1])]
    for i in range(steps):
        token = jnp.argmax(logits[-1], axis=-1)[:, None]
        hidden, cache = step(params, token, jnp.full((batch, 1), length + i), cache)
        logits.append(output_logits(params, hidden[:, -1]))
    return np.stack([np.asarray(x) for x in logits], axis=1)


def test_a_packed_model_decodes_like_its_dequantized_weights():
    config = get_size("afm-tiny")
    params = init_params(config, jax.random.PRNGKey(3))
    packed = P.pack_params(params, bits=4)
    assert P.is_packed(packed) and isinstance(packed["embed"], P.PackedWeight) and packed["embed"].bits == 8
    dequantized = jax.tree.map(
        lambda w: w.dequantize() if isinstance(w, P.PackedWeight) else w,
        packed,
        is_leaf=lambda w: isinstance(w, P.PackedWeight),
    )
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 0, config.vocab_size)
    reference = _decode_logits(dequantized, config, tokens, steps=6)
    got = _decode_logits(packed, config, tokens, steps=6)
    # the kernel may round activations to bf16 (CPUs with AVX512-BF16): a bf16-sized difference
    assert np.abs(got - reference).max() <= 2e-2 * np.abs(reference).max()
    assert (got.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


@needs_kernels
@pytest.mark.skipif(
    kernels.bf16_arithmetic() != "amx", reason="the CPU has no AMX tiles (or the OS did not grant them)"
)
def test_without_amx_tiles_the_same_results(child_pytest):
    """The checked fallback: with the tiles refused (AFMKIT_AMX=0, as on a system that does not grant
    them) the row kernel runs every batch with AMX's sums: within numpy's bounds, batch-invariant."""
    child_pytest({"AFMKIT_AMX": "0"}, "test_kernel_matches_numpy_in_fp32_and_bf16 or a_row_gives_the_same")


@pytest.mark.slow
@needs_kernels
@pytest.mark.skipif(not kernels.has_bf16(), reason="the CPU has no AVX512-BF16: no bf16 path")
@pytest.mark.parametrize(
    "flags", ["-mamx-tile -mamx-bf16", "-mno-amx-tile -mno-amx-bf16"], ids=["amx-arithmetic", "pairs-arithmetic"]
)
def test_kernels_built_with_and_without_amx(flags, tmp_path, child_pytest):
    """Both sums of the bf16 path on any CPU with AVX512-BF16: built for AMX (where the CPU has no
    tiles, the row kernel emulates them at every batch) and built without it (vdpbf16ps's chain)."""
    child_pytest(
        {"AFMKIT_KERNEL_FLAGS": flags, "AFMKIT_CACHE": str(tmp_path)},
        "test_kernel_matches_numpy_in_fp32_and_bf16 or a_row_gives_the_same or decodes_like",
    )
    assert list(tmp_path.glob("kernels/cpu_kernels-*.so")), "the kernels were not rebuilt with the flags"


# Slow (CI runs it when time allows): a child pytest that rebuilds the kernels with other ISA flags.
@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize(
    "flags",
    ["-mno-avx512bf16", "-mno-avx512f", "-mno-avx512f -mno-avx2 -mno-fma"],
    ids=["avx512-fp32", "avx2", "portable"],
)
def test_kernels_built_for_cpus_without_avx512(flags, tmp_path, child_pytest):
    """The AVX-512 code without bf16 dot products, the AVX2 and the plain C++ code of the kernels
    (this machine may otherwise build another) pass this file's kernel tests too."""
    tests = ["test_kernel_matches_numpy_in_fp32_and_bf16", "a_row_gives_the_same", "decode_attention", "decodes_like"]
    child_pytest({"AFMKIT_KERNEL_FLAGS": flags, "AFMKIT_CACHE": str(tmp_path)}, " or ".join(tests))
    assert list(tmp_path.glob("kernels/cpu_kernels-*.so")), "the kernels were not rebuilt with the flags"


@needs_kernels
def test_decode_attention_kernel_and_the_xla_path_give_the_same_logits(monkeypatch):
    """CPUs decode through the kernel; accelerators through XLA's attention. Both must agree."""
    config = get_size("afm-tiny")
    params = init_params(config, jax.random.PRNGKey(5))
    tokens = jax.random.randint(jax.random.PRNGKey(6), (3, 7), 0, config.vocab_size)
    with_kernel = _decode_logits(params, config, tokens, steps=5)
    monkeypatch.setattr(kernels, "on_cpu", lambda: False)
    with_xla = _decode_logits(params, config, tokens, steps=5)
    np.testing.assert_allclose(with_kernel, with_xla, atol=1e-4 * np.abs(with_xla).max())
    assert (with_kernel.argmax(-1) == with_xla.argmax(-1)).all()
