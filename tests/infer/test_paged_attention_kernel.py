"""Paged decode attention reads the block pool in place (issue 11 §2): the native kernel gives a
numpy transcription of softmax attention over each row's blocks, the very bits of the contiguous
kernel on the same keys and values, and zeros for a block-table entry outside the pool, as the
XLA path reads it; a paged decode step gives the contiguous step's logits with and without it."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit import kernels
from afmkit.config import get_size
from afmkit.model.kv_cache import UNALLOCATED, KVCache, PagedKVCache, PagedLayer
from afmkit.model.transformer import forward, init_params, output_logits

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler to build afmkit's CPU kernels")
EPS32 = np.finfo(np.float32).eps


def _paged_problem(groups, dim, page=16, seed=0):
    """Four rows over a shuffled pool: lengths ending mid-block, on a block edge and at one
    position; row 3's second table entry is no block (its positions read zeros)."""
    rng = np.random.default_rng(seed)
    kv, blocks, width = 2, 20, 5
    lengths = np.array([1, 2 * page, 3 * page + 5, 2 * page - 3], np.int32)
    tables = np.full((lengths.size + 1, width), UNALLOCATED, np.int32)  # one spare table line
    order = rng.permutation(blocks)
    tables[0, :1], tables[1, :2], tables[2, :4], tables[3, :2] = order[:1], order[1:3], order[3:7], order[7:9]
    tables[3, 1] = UNALLOCATED
    q = rng.standard_normal((lengths.size, kv, groups, dim)).astype(np.float32)
    keys = rng.standard_normal((blocks, kv, dim, page)).astype(np.float32)
    values = rng.standard_normal((blocks, kv, page, dim)).astype(np.float32)
    return q, keys, values, tables, lengths


def _contiguous(keys, values, tables, width_positions):
    """The rows' blocks in the contiguous layout (numpy), zeros where a table entry is no block."""
    blocks, kv, dim, page = keys.shape
    rows = tables.shape[0]
    k = np.zeros((rows, kv, dim, width_positions), np.float32)
    v = np.zeros((rows, kv, width_positions, dim), np.float32)
    for b in range(rows):
        for i, block in enumerate(tables[b]):
            if block < blocks and i * page < width_positions:
                k[b, :, :, i * page : (i + 1) * page] = keys[block]
                v[b, :, i * page : (i + 1) * page] = values[block]
    return k, v


def _run_paged(q, keys, values, tables, lengths, scale):
    call = jax.jit(kernels.paged_decode_attention, static_argnames="scale")
    return np.asarray(call(*map(jnp.asarray, (q, keys, values, tables, lengths)), scale=scale))


def _numpy_attention(q, keys, values, tables, lengths, scale):
    k, v = _contiguous(keys, values, tables, tables.shape[1] * keys.shape[-1])
    out = []
    for b, n in enumerate(lengths):
        scores = np.einsum("kgd,kds->kgs", q[b].astype(np.float64), k[b, :, :, :n]) * scale
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out.append(np.einsum("kgs,ksd->kgd", probs, v[b, :, :n]))
    return np.stack(out), v


@needs_kernels
@pytest.mark.parametrize("groups,dim", [(1, 32), (3, 64), (5, 32), (2, 8)])  # 5 and dim 8: the portable code
def test_paged_kernel_matches_numpy_softmax_attention_over_each_rows_blocks(groups, dim):
    q, keys, values, tables, lengths = _paged_problem(groups, dim)
    scale = 1 / np.sqrt(dim)
    got = _run_paged(q, keys, values, tables, lengths, scale)
    want, v = _numpy_attention(q, keys, values, tables, lengths, scale)
    for b, n in enumerate(lengths):
        # Each output is a sum of n products p * v (sum p = 1) in fp32: at most (n + 4) roundings
        # of relative size eps, each bounded by max|v| (the 4 cover exp's ~2 ulp and the 1 / sum).
        tolerance = (n + 4) * EPS32 * np.abs(v[b, :, :n]).max()
        np.testing.assert_allclose(got[b], want[b], rtol=0, atol=tolerance)


def test_the_xla_paged_decode_attention_matches_numpy_over_each_rows_blocks():
    """The accelerators' path (and AFMKIT_KERNELS=0): blocks scored where they land."""
    q, keys, values, tables, lengths = _paged_problem(3, 32, seed=2)
    layer = PagedLayer(jnp.asarray(keys), jnp.asarray(values), None, None, jnp.asarray(tables))
    width = tables.shape[1] * keys.shape[-1]
    got = np.asarray(jax.jit(layer.decode_attention, static_argnums=2)(jnp.asarray(q), jnp.asarray(lengths), width))
    want, v = _numpy_attention(q, keys, values, tables, lengths, 1 / np.sqrt(32))
    for b, n in enumerate(lengths):  # as in the kernel test: (n + 4) roundings of at most eps * max|v|
        np.testing.assert_allclose(got[b], want[b], rtol=0, atol=(n + 4) * EPS32 * np.abs(v[b, :, :n]).max())


@needs_kernels
@pytest.mark.parametrize("groups,dim", [(3, 64), (5, 32)])
def test_paged_kernel_gives_the_contiguous_kernels_bits(groups, dim):
    """Same positions summed in the same order: the paged cache changes where keys live, not the
    arithmetic, so a row decodes to the same bits through either layout."""
    q, keys, values, tables, lengths = _paged_problem(groups, dim, seed=1)
    capacity = tables.shape[1] * keys.shape[-1]
    k, v = _contiguous(keys, values, tables, capacity)
    scale = 1 / np.sqrt(dim)
    paged = _run_paged(q, keys, values, tables, lengths, scale)
    contiguous = jax.jit(kernels.decode_attention, static_argnames="scale")(
        *map(jnp.asarray, (q, k, v, lengths)), scale=scale
    )
    np.testing.assert_array_equal(paged, np.asarray(contiguous))
    row_without_a_block = _run_paged(q[:1], keys, values, np.full((1, 5), UNALLOCATED, np.int32), lengths[2:3], scale)
    # all-zero keys: uniform attention over zero values
    np.testing.assert_array_equal(row_without_a_block, np.zeros_like(row_without_a_block))


def _decode_logits(config, params, tokens, make_cache, tables=None, steps=4):
    """Prefill ``tokens`` then greedy-decode ``steps`` tokens, one row per prompt."""
    batch, length = tokens.shape
    cache = make_cache()
    if tables is not None:
        cache = PagedKVCache(cache.k, cache.v, cache.k_scale, cache.v_scale, tables)
    step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, c, config=config, attend_len=64))
    hidden, cache = step(params, tokens, jnp.broadcast_to(jnp.arange(length), tokens.shape), cache)
    logits = [output_logits(params, hidden[:, -1])]
    for i in range(steps):
        token = logits[-1].argmax(-1)[:, None]
        hidden, cache = step(params, token, jnp.full((batch, 1), length + i), cache)
        logits.append(output_logits(params, hidden[:, -1]))
    return np.stack([np.asarray(x) for x in logits])


@pytest.mark.parametrize("native", [True, False])
def test_paged_decode_steps_give_the_contiguous_logits(native, monkeypatch):
    """With the kernel (CPU) and through XLA's gather (accelerators, ``AFMKIT_KERNELS=0``)."""
    if native and not kernels.available():
        pytest.skip("no C++ compiler to build afmkit's CPU kernels")
    if not native:
        monkeypatch.setattr(kernels, "on_cpu", lambda: False)
    config = get_size("afm-tiny")
    params = init_params(config, jax.random.PRNGKey(5))
    tokens = jax.random.randint(jax.random.PRNGKey(6), (3, 21), 0, config.vocab_size)
    contiguous = _decode_logits(config, params, tokens, lambda: KVCache.zeros(config, batch=3, capacity=64))
    page = 16
    tables = jnp.asarray([[7, 2, 9, 0], [1, 8, 4, 11], [3, 10, 5, 6]], jnp.int32)  # shuffled blocks
    paged = _decode_logits(
        config, params, tokens, lambda: PagedKVCache.zeros(config, blocks=12, page=page), tables=tables
    )
    if native:  # the same kernel arithmetic in the same order
        np.testing.assert_array_equal(paged, contiguous)
    else:  # the same gathered values through XLA's attention: equal up to fp32 reduction order
        np.testing.assert_allclose(paged, contiguous, rtol=0, atol=1e-4 * np.abs(contiguous).max())
    assert (paged.argmax(-1) == contiguous.argmax(-1)).all()


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avx2 -mno-fma"])
def test_paged_kernel_tests_pass_without_avx512(flags, tmp_path):
    """The portable build (what CPUs without AVX-512 run) passes this file's kernel tests."""
    env = {**os.environ, "AFMKIT_KERNEL_FLAGS": flags, "AFMKIT_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", __file__, "-k", "matches_numpy or contiguous_kernels_bits"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-1000:]


def _rss_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@needs_kernels
def test_a_lazy_pool_reads_zeros_and_takes_memory_only_where_written():
    """The paged pool on CPUs: 256 MiB reserved cost (almost) nothing until blocks are written."""
    make = jax.jit(lambda: kernels.lazy_zeros((64, 1024, 1024), jnp.float32))  # 256 MiB
    write = jax.jit(lambda a: a.at[:32].set(1.0), donate_argnums=0)  # half of it
    make().block_until_ready()  # compiled, and the allocator warmed up
    before = _rss_bytes()
    pool = make()
    pool.block_until_ready()
    reserved = _rss_bytes() - before
    pool = write(pool)
    pool.block_until_ready()
    written = _rss_bytes() - before
    assert reserved < 16 * 2**20, reserved  # at most the partial pages at the ends and bookkeeping
    assert written > 100 * 2**20, written  # the 128 MiB written are committed
    assert not np.asarray(jax.jit(lambda a: a[32:].any())(pool))  # the rest reads zeros
    small = np.asarray(jax.jit(lambda: kernels.lazy_zeros((3, 5, 7), jnp.int8))())  # within one page
    assert small.shape == (3, 5, 7) and not small.any()
