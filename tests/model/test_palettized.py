"""The palettized weight leaf: index packing, the matmul `linear` runs, adapters on top, and
saving and loading in afmkit's own checkpoint format."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afmkit
from afmkit import kernels
from afmkit.adapters.lora import AdapterBank, LoraConfig, merge, random_adapter, single
from afmkit.adapters.peft_io import base_fingerprint
from afmkit.compress.palettize import palettize_matrix, palettize_params
from afmkit.config import get_size
from afmkit.errors import CorruptFileError, UserError
from afmkit.interop import native
from afmkit.model.packed import PackedWeight, dequantize_params
from afmkit.model.palettized import (
    PalettizedWeight,
    dequantize_numpy,
    from_codes,
    pack_codes,
    unpack_codes,
    values_at,
)
from afmkit.model.transformer import init_params, linear, logits_fn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_round_trip_through_the_packed_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(40, 48))
    codes[0, :] = 2**bits - 1  # every bit of a word set somewhere
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, bits, 16)  # exactly `bits` bits per code
    np.testing.assert_array_equal(unpack_codes(packed, bits, np), codes)
    np.testing.assert_array_equal(np.asarray(unpack_codes(jnp.asarray(packed), bits, jnp)), codes)


def test_layout_is_the_documented_bit_order():
    """8 consecutive inputs of one output form one little-endian word, code p at bit 3p (3 bits)."""
    codes = np.zeros((8, 16), np.int64)
    codes[:, 5] = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(int(c) << (3 * p) for p, c in enumerate(codes[:, 5]))
    packed = pack_codes(codes, 3)
    assert [int(b) for b in packed[0, 0, :, 5]] == [(word >> (8 * q)) & 255 for q in range(3)]
    assert not packed[0, 0, :, :5].any() and not packed[0, 0, :, 6:].any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_linear_matches_numpy_on_the_dequantized_weight(bits, rows):
    rng = np.random.default_rng(10 * bits + rows)
    w = rng.normal(size=(96, 2, 16)).astype(np.float32) * 0.1  # wq-like [d, heads, head_dim]
    p = palettize_matrix(w, bits)
    x = rng.normal(size=(1, rows, 96)).astype(np.float32)
    got = np.asarray(linear("btd,dhk->bthk", jnp.asarray(x), p))
    expected = (x.astype(np.float64) @ dequantize_numpy(p).astype(np.float64)).reshape(1, rows, 2, 16)
    # fp32 products of K = 96 terms, accumulated in fp32: each result is within K * eps32 of the
    # sum of |x| |w| (the usual bound for a dot product), float64 being exact by comparison; where
    # the native kernel rounds x and the table entries to bf16 (AVX512-BF16), 2^-7 + 2^-16 of it more.
    rounding = 2.0**-7 + 2.0**-16 if kernels.on_cpu() and kernels.has_bf16() else 0.0
    bound = (96 * np.finfo(np.float32).eps + rounding) * (np.abs(x) @ np.abs(dequantize_numpy(p)))
    bound = bound.reshape(1, rows, 2, 16)
    assert np.all(np.abs(got - expected) <= bound)
    # a row's result does not depend on the rows beside it
    alone = np.asarray(linear("btd,dhk->bthk", jnp.asarray(x[:, :1]), p))
    assert np.all(np.abs(alone - expected[:, :1]) <= bound[:, :1])


def test_gradient_reaches_the_input_and_the_tables():
    rng = np.random.default_rng(0)
    p = palettize_matrix(rng.normal(size=(32, 16)).astype(np.float32), 4)
    x = jnp.asarray(rng.normal(size=(3, 32)).astype(np.float32))
    w = jnp.asarray(dequantize_numpy(p))
    grad_x = jax.grad(lambda x: linear("bd,df->bf", x, p).sum())(x)
    # through the kernel on a CPU with AVX512-BF16 both factors are rounded to bf16 (2^-8 each)
    rounding = (2.0**-7 + 2.0**-16 if kernels.on_cpu() and kernels.has_bf16() else 0.0) + 16 * 2.0**-24
    w64 = np.asarray(w, np.float64)
    expected = np.ones((3, 16)) @ w64.T
    assert np.all(np.abs(np.asarray(grad_x, np.float64) - expected) <= rounding * (np.ones((3, 16)) @ np.abs(w64).T))
    grad_tables = jax.grad(lambda t: linear("bd,df->bf", x, dataclasses.replace(p, tables=t)).sum())(
        p.tables.astype(jnp.float32)
    )
    assert grad_tables.shape == p.tables.shape and float(jnp.abs(grad_tables).sum()) > 0


def test_refusals_of_bad_parts():
    for call in (
        lambda: from_codes(np.zeros((8, 16), int), np.zeros((1, 16)), None, bits=5, shape=(8, 16)),
        lambda: from_codes(np.full((8, 16), 16), np.zeros((1, 16)), None, bits=4, shape=(8, 16)),
        lambda: from_codes(np.zeros((8, 16), int), np.zeros((1, 16)), np.ones(8), bits=4, shape=(8, 16)),
        lambda: from_codes(np.zeros((8, 16), int), np.zeros((3, 16)), None, bits=4, shape=(8, 16)),
    ):
        with pytest.raises(UserError) as error:
            call()
        assert "\n" not in str(error.value)


def _small_config():
    """afm-tiny's architecture (GQA, q/k-norm, tied embedding) narrowed so that it is quick."""
    return dataclasses.replace(
        get_size("afm-tiny"), d_model=64, d_ff=128, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, vocab_size=512
    )


@pytest.fixture(scope="module")
def palettized_model(smollm2):
    config = _small_config()
    params = init_params(config, jax.random.PRNGKey(1))
    bits = {f"layers.{i}.{m}": b for i in range(2) for m, b in zip(("wq", "wk", "wv", "wo"), (2, 3, 4, 8))}
    bits.update({f"layers.{i}.{m}": 4 for i in range(2) for m in ("w_gate", "w_up", "w_down")})
    params = palettize_params(params, bits)
    return afmkit.LanguageModel(config, params, smollm2.tokenizer, name="palettized-tiny")


_jitted_logits = jax.jit(logits_fn, static_argnames=("config",))


def _logits(config, params, tokens, adapters=None):
    return np.asarray(_jitted_logits(params, jnp.asarray(tokens), config=config, adapters=adapters))


def test_adapters_on_a_palettized_base_equal_them_on_its_dequantized_weights(palettized_model, monkeypatch):
    config, params = palettized_model.config, palettized_model.params
    # The kernels in fp32 (their bf16 rounding is bounded by the kernel tests), so both sides hold
    # the same fp32 weights and differ by summation order only; a new function, so traced afresh.
    monkeypatch.setattr(kernels, "has_bf16", lambda: False)
    fp32_logits = jax.jit(lambda params, tokens, adapters: logits_fn(params, tokens, config=config, adapters=adapters))

    def _logits(config, params, tokens, adapters=None):
        return np.asarray(fp32_logits(params, jnp.asarray(tokens), adapters))

    dequantized = dequantize_params(params)
    assert not any(isinstance(w, (PalettizedWeight, PackedWeight)) for w in jax.tree.leaves(dequantized))
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (3, 12), 0, config.vocab_size))
    adapters = [
        random_adapter(config, LoraConfig(rank=8), jax.random.PRNGKey(s), b_std=0.05, name=f"a{s}") for s in (1, 2)
    ]
    bank = AdapterBank.for_adapters(config, adapters, slots=3)
    slots = [1, 0, 2]
    base = _logits(config, params, tokens)
    reference_base = _logits(config, dequantized, tokens)
    # The same fp32 weights, summed in other orders: each matmul within K * 2^-24 of its sum of
    # |x w| (K <= 128 here), a relative 2^-17 that a few layers grow to a few times that; 2^-12 of
    # the largest logit bounds it with room, and a wrong table, code or adapter moves logits O(1).
    slack = 2.0**-12 * np.abs(reference_base).max()
    assert np.abs(base - reference_base).max() <= slack
    # one adapter for every row, and a mixed batch (row 1 without one)
    for adapters_of_rows in (single(adapters[0]), bank.rows(slots)):
        on_palettized = _logits(config, params, tokens, adapters_of_rows)
        on_dequantized = _logits(config, dequantized, tokens, adapters_of_rows)
        assert np.abs(on_palettized - on_dequantized).max() <= slack
        # the adapters do change the output, by far more than the slack
        changed = np.abs(on_dequantized - reference_base).max(axis=(1, 2))
        assert np.all(changed[[0, 2]] > 10 * slack)
    with pytest.raises(UserError, match="palettized"):
        merge(params, adapters[0])


def test_fingerprint_reads_the_palettized_values(palettized_model):
    config, params = palettized_model.config, palettized_model.params
    w = params["layers"][0]["wo"]
    positions = np.array([0, 5, 1000, w.k * w.n - 1])
    np.testing.assert_array_equal(values_at(w, positions), np.asarray(w.dequantize()).reshape(-1)[positions])
    # equal to the dequantized model's: an adapter trained on either serves on the other
    assert base_fingerprint(config, params) == base_fingerprint(config, dequantize_params(params))


def test_save_and_load_keep_the_compressed_weights(palettized_model, tmp_path):
    config, params = palettized_model.config, palettized_model.params
    native.save_checkpoint(tmp_path / "m", config, params, palettized_model.tokenizer)
    meta = json.loads((tmp_path / "m" / native.MARKER).read_text())
    assert meta["quantized"]["layers.0.wk"] == {"kind": "palettized", "bits": 3, "shape": [64, 1, 32], "in_axes": [0]}
    assert meta["quantized"]["embed"]["kind"] == "packed"
    loaded = afmkit.load(tmp_path / "m")
    flat = jax.tree_util.tree_leaves_with_path(params)
    loaded_flat = jax.tree_util.tree_leaves_with_path(loaded.params)
    assert jax.tree.structure(params) == jax.tree.structure(loaded.params)
    for (path, a), (_, b) in zip(flat, loaded_flat):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = np.arange(1, 17)[None]
    np.testing.assert_array_equal(_logits(config, loaded.params, tokens), _logits(config, params, tokens))
    # compressed on disk: far smaller than fp32 matrices
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert size < 0.5 * sum(4 * np.prod(s.shape) for s in jax.tree.leaves(init_params(config, jax.random.PRNGKey(0))))


def test_a_damaged_compressed_checkpoint_is_refused_in_one_line(palettized_model, tmp_path):
    config, params = palettized_model.config, palettized_model.params
    native.save_checkpoint(tmp_path / "m", config, params, palettized_model.tokenizer)
    marker = tmp_path / "m" / native.MARKER
    good = json.loads(marker.read_text())
    damages = [
        lambda meta: meta["quantized"]["layers.1.wv"].update(bits=2),  # parts of another size
        lambda meta: meta["quantized"]["layers.1.wv"].update(shape=[64, 2, 32]),
        lambda meta: meta["quantized"]["layers.1.wv"].update(kind="sparse"),
        lambda meta: meta["quantized"]["layers.1.wv"].pop("in_axes"),
        lambda meta: meta["quantized"]["embed"].update(bits=4),
    ]
    for damage in damages:
        meta = json.loads(json.dumps(good))
        damage(meta)
        marker.write_text(json.dumps(meta))
        with pytest.raises(CorruptFileError) as error:
            afmkit.load(tmp_path / "m")
        assert "\n" not in str(error.value) and "damaged" in str(error.value)
    marker.write_text(json.dumps(good))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(CorruptFileError) as error:
        afmkit.load(tmp_path / "m")
    assert "\n" not in str(error.value)
