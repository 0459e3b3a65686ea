"""Palettized weights: each weight is an index into a small look-up table (AFM's on-device format).

A ``PalettizedWeight`` stands in for a matrix in the weight pytree, as ``PackedWeight`` does.
Every group of ``group_rows`` (16) output rows shares one table of ``2^bits`` values (coremltools'
``per_grouped_channel``; bits 2, 3, 4 or 8), and each output row may carry a scale that multiplies
its table values (``w[k, n] = tables[n // group_rows, code[k, n]] * scales[n]``). The tables come
from k-means (``afmkit.compress.palettize``); this module only stores and multiplies.

Index layout, like ``PackedWeight``'s tiles of 16 outputs so that a kernel reads one tile's codes
contiguously: ``indices`` is uint8 ``[N / 16, K / 8, bits, 16]``. For 8 consecutive inputs
``k0..k0+7`` and output lane ``j`` of a tile, the 8 codes form one ``8 * bits``-bit word
``sum_p code[k0 + p] << (bits * p)``, stored little-endian as ``bits`` bytes ``[.., 0..bits-1, j]``.
That costs exactly ``bits`` bits per weight, 3 bits included.

``linear`` multiplies by it, on CPUs with afmkit's native kernel (``kernels/palettized_kernels.cc``:
each code picks its table entry in registers, so a decode step reads ``bits`` bits per weight, not
32), elsewhere through XLA on the dequantized matrix; fp32 table values and accumulation either way.
Adapters add their update on top of the result, as on any base weight.

With ``activation_bits=8`` (``afmkit.load(..., activations="int8")``) a matmul quantizes its input
per token (each row of ``x`` to int8 by its own absmax scale, at run time) and the tables per group
(int8, absmax scale), and sums exact int32 products (``int8_matmul``): AFM's activation
quantization, for CPUs with 8-bit dot products (AVX512-VNNI). Gradients pass straight through to the
fp32 matmul's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.errors import UserError
from afmkit.model.packed import input_gradient

TILE = 16  # outputs per tile of indices
CODES_PER_WORD = 8  # inputs whose codes share one word of ``bits`` bytes
BITS = (2, 3, 4, 8)
# int8 scale per unit of absmax: a product with fp32(1/127), which XLA keeps as written (it may turn a
# division by a constant into this product, so a reference could not know which it ran)
INT8_STEP = np.float32(1 / 127)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PalettizedWeight:
    """A weight of logical ``shape`` whose ``in_axes`` are contracted with the input."""

    indices: jax.Array  # uint8 [N / 16, K / 8, bits, 16] (see the module docstring)
    tables: jax.Array  # fp16 [N / group_rows, 2^bits]
    scales: jax.Array | None  # fp16 [N], or None (no per-row scale)
    bits: int = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    in_axes: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    # None: fp32 inputs; 8: inputs quantized per token to int8 at run time (a load option, not saved)
    activation_bits: int | None = dataclasses.field(default=None, metadata={"static": True})

    dtype = jnp.dtype(jnp.float32)  # what it computes in and dequantizes to

    @property
    def out_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a not in self.in_axes)

    @property
    def k(self) -> int:
        return math.prod(self.shape[a] for a in self.in_axes)

    @property
    def n(self) -> int:
        return math.prod(self.shape[a] for a in self.out_axes)

    @property
    def group_rows(self) -> int:
        return self.n // self.tables.shape[0]

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight: the indices plus the fp16 tables and scales spread over them."""
        stored = self.indices.size * 8 + self.tables.size * 16 + (0 if self.scales is None else self.scales.size * 16)
        return stored / (self.k * self.n)

    def codes(self) -> jax.Array:
        """The table index of every weight, ``[K, N]`` int32."""
        return unpack_codes(self.indices, self.bits, jnp)

    def matrix(self) -> jax.Array:
        """The dequantized ``[K, N]`` matrix (inputs by outputs), fp32."""
        return _dequantize(self.indices, self.tables, self.scales, self.bits, jnp)

    def dequantize(self) -> jax.Array:
        """The dequantized weight in its logical shape and axis order, fp32."""
        ins, outs = self.in_axes, self.out_axes
        w = self.matrix().reshape([self.shape[a] for a in ins + outs])
        return w.transpose(np.argsort(ins + outs))


def check_layout(shape: tuple[int, ...], in_axes: tuple[int, ...], bits: int, group_rows: int) -> None:
    """A ``UserError`` unless a weight of ``shape`` can be palettized this way."""
    if bits not in BITS:
        raise UserError(f"palettized weights have {', '.join(map(str, BITS))} bits per index, not {bits}")
    k = math.prod(shape[a] for a in in_axes)
    n = math.prod(s for a, s in enumerate(shape) if a not in in_axes)
    if k % CODES_PER_WORD or n % TILE:
        raise UserError(
            f"a weight of shape {shape} cannot be palettized: its inputs must be a multiple of "
            f"{CODES_PER_WORD} and its outputs of {TILE}"
        )
    if group_rows < 1 or n % group_rows:
        raise UserError(
            f"groups of {group_rows} output rows do not divide the {n} outputs of a weight of shape {shape}"
        )


def from_codes(
    codes: Any, tables: Any, scales: Any, *, bits: int, shape: tuple[int, ...], in_axes: tuple[int, ...] = (0,)
) -> PalettizedWeight:
    """A ``PalettizedWeight`` from table indices ``codes [K, N]`` (inputs by outputs, each below
    ``2^bits``), ``tables [groups, 2^bits]`` and ``scales [N]`` (or None)."""
    codes = np.asarray(codes)
    tables = np.asarray(tables, np.float16)
    k = math.prod(shape[a] for a in in_axes)
    n = math.prod(s for a, s in enumerate(shape) if a not in in_axes)
    if codes.shape != (k, n) or tables.ndim != 2 or tables.shape[1] != 2**bits or n % tables.shape[0]:
        raise UserError(
            f"palettized weight parts do not fit shape {shape}: codes {codes.shape}, tables {tables.shape}, {bits} bits"
        )
    check_layout(shape, in_axes, bits, n // tables.shape[0])
    if codes.min() < 0 or codes.max() >= 2**bits:
        raise UserError(f"palettized codes must lie in [0, {2**bits})")
    if scales is not None:
        scales = np.asarray(scales, np.float16)
        if scales.shape != (n,):
            raise UserError(f"palettized scales have shape {scales.shape}; a weight with {n} outputs needs ({n},)")
        scales = jnp.asarray(scales)
    return PalettizedWeight(
        indices=jnp.asarray(pack_codes(codes, bits)),
        tables=jnp.asarray(tables),
        scales=scales,
        bits=bits,
        shape=tuple(shape),
        in_axes=tuple(in_axes),
    )


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[K, N]`` to the index layout ``uint8 [N / 16, K / 8, bits, 16]``."""
    k, n = codes.shape
    # [K/8, 8 inputs, N/16, 16 lanes] -> one word per (block of 8 inputs, output)
    blocks = codes.astype(np.uint64).reshape(k // CODES_PER_WORD, CODES_PER_WORD, n // TILE, TILE)
    words = (blocks << (bits * np.arange(CODES_PER_WORD, dtype=np.uint64))[None, :, None, None]).sum(axis=1)
    words = words.astype(np.uint64)  # [K/8, N/16, 16]
    byte_planes = [((words >> np.uint64(8 * q)) & np.uint64(255)).astype(np.uint8) for q in range(bits)]
    return np.ascontiguousarray(np.stack(byte_planes, axis=2).transpose(1, 0, 2, 3))  # [N/16, K/8, bits, 16]


def unpack_codes(indices: Any, bits: int, xp: Any) -> Any:
    """The index layout back to codes ``[K, N]`` (int32), in numpy (``xp=np``) or jax (``jnp``)."""
    codes = _code_tiles(indices, bits, xp)  # [N/16, K/8, 8, 16]
    tiles, blocks, per_word, lanes = codes.shape
    return codes.transpose(1, 2, 0, 3).reshape(blocks * per_word, tiles * lanes)


def _code_tiles(indices: Any, bits: int, xp: Any) -> Any:
    """The codes as ``[N/16, K/8, 8, 16]`` (int32), the index layout's order."""
    mask = 2**bits - 1
    if bits == 8:
        return indices.astype(xp.int32)  # one byte per code
    planes = indices.astype(xp.uint32)
    words = sum(planes[:, :, q, :] << (8 * q) for q in range(bits))  # [N/16, K/8, 16]
    return xp.stack([(words >> (bits * p)) & mask for p in range(CODES_PER_WORD)], axis=2).astype(xp.int32)


def _dequantize(indices: Any, tables: Any, scales: Any, bits: int, xp: Any, *, transposed: bool = False) -> Any:
    """The matrix ``[K, N]`` (fp32), or with ``transposed`` ``[N, K]`` gathered in that order: the
    layout the input gradient's bf16 matmul needs (XLA multiplies a transposed ``[K, N]`` in fp32)."""
    codes = _code_tiles(indices, bits, xp)  # [N/16, K/8, 8, 16]
    tiles, blocks, per_word, lanes = codes.shape
    if transposed:
        codes = codes.transpose(0, 3, 1, 2).reshape(tiles * lanes, blocks * per_word)
    else:
        codes = codes.transpose(1, 2, 0, 3).reshape(blocks * per_word, tiles * lanes)
    out_axis = 0 if transposed else 1
    n = codes.shape[out_axis]
    groups, entries = tables.shape
    group = xp.expand_dims(xp.arange(n) // (n // groups), 1 - out_axis)
    values = tables.astype(xp.float32).reshape(-1)[group * entries + codes]
    return values if scales is None else values * xp.expand_dims(scales.astype(xp.float32), 1 - out_axis)


def dequantize_numpy(weight: PalettizedWeight) -> np.ndarray:
    """The dequantized ``[K, N]`` matrix computed in numpy (an independent check of the XLA path)."""
    scales = None if weight.scales is None else np.asarray(weight.scales)
    return _dequantize(np.asarray(weight.indices), np.asarray(weight.tables), scales, weight.bits, np)


def values_at(weight: PalettizedWeight, positions: np.ndarray) -> np.ndarray:
    """The dequantized values at flat positions of the weight's logical shape (fp32, numpy: no
    compilation per weight shape, e.g. for ``adapters.peft_io.base_fingerprint``)."""
    index = np.unravel_index(positions, weight.shape)
    k = np.ravel_multi_index([index[a] for a in weight.in_axes], [weight.shape[a] for a in weight.in_axes])
    n = np.ravel_multi_index([index[a] for a in weight.out_axes], [weight.shape[a] for a in weight.out_axes])
    return dequantize_numpy(weight)[k, n]


def palettized_linear(x: jax.Array, weight: PalettizedWeight) -> jax.Array:
    """``x``'s trailing axes contracted with the weight's ``in_axes`` (fp32), as ``linear`` does.
    Gradients reach ``x`` (adapters trained on a palettized base), the tables and the scales, never
    the integer indices."""
    n_in = len(weight.in_axes)
    if x.shape[x.ndim - n_in :] != tuple(weight.shape[a] for a in weight.in_axes):
        raise ValueError(f"input {x.shape} does not match palettized weight {weight.shape} (in_axes {weight.in_axes})")
    lead = x.shape[: x.ndim - n_in]
    y = palettized_matmul(x.reshape(-1, weight.k), weight)
    return y.reshape(*lead, *(weight.shape[a] for a in weight.out_axes))


def palettized_matmul(x: jax.Array, weight: PalettizedWeight) -> jax.Array:
    """``x [M, K] @ W [K, N]``, fp32 out. On CPUs (tables of a multiple of 16 rows, as
    ``compress`` makes them) the native kernel: each row summed in the same order whatever its
    batch, the scale applied once per output; where the CPU has AVX512-BF16, x and the table
    entries rounded to bf16 for its dot products (as ``packed_matmul`` rounds x), at every batch
    size. Elsewhere XLA expands the matrix and multiplies."""
    from afmkit import kernels

    x = x.astype(jnp.float32)
    if weight.activation_bits == 8:
        return _int8_matmul(x, weight.indices, weight.tables, weight.scales, weight.bits)
    if weight.group_rows % TILE == 0 and kernels.on_cpu():
        how = (weight.bits, kernels.has_bf16())
        return _native_matmul(x, weight.indices, weight.tables, weight.scales, how)
    return _xla_matmul(x, weight.indices, weight.tables, weight.scales, weight.bits)


def _xla_matmul(x: jax.Array, indices: jax.Array, tables: jax.Array, scales: Any, bits: int) -> jax.Array:
    return jnp.dot(x, _dequantize(indices, tables, scales, bits, jnp))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _native_matmul(
    x: jax.Array, indices: jax.Array, tables: jax.Array, scales: Any, how: tuple[int, bool]
) -> jax.Array:
    from afmkit import kernels

    bits, bf16 = how
    return kernels.palettized_matmul(x, indices, tables, scales, bits=bits, bf16=bf16)


def _native_matmul_fwd(x: jax.Array, indices: jax.Array, tables: jax.Array, scales: Any, how: tuple[int, bool]) -> Any:
    return _native_matmul(x, indices, tables, scales, how), (x, indices, tables, scales)


def _xla_gradients(bits: int, saved: Any, grad: jax.Array, bf16: bool = False) -> Any:
    """The XLA path's gradients (to x, the tables and the scales; x's in bf16 where ``bf16``, see
    ``packed.input_gradient``); none to the integer indices. Only what the step uses is computed:
    XLA drops the tables' and scales' where they do not train."""
    x, indices, tables, scales = saved
    _, pullback = jax.vjp(lambda t, s: _xla_matmul(x, indices, t, s, bits), tables, scales)
    grad_tables, grad_scales = pullback(grad)
    grad_x = input_gradient(grad, _dequantize(indices, tables, scales, bits, jnp, transposed=True), bf16)
    return grad_x, None, grad_tables, grad_scales


def _native_matmul_bwd(how: tuple[int, bool], saved: Any, grad: jax.Array) -> Any:
    return _xla_gradients(how[0], saved, grad, bf16=how[1])


_native_matmul.defvjp(_native_matmul_fwd, _native_matmul_bwd)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per row (dynamic per-token quantization): ``x ~ codes * scales[:, None]``,
    ``scales = max|x| * fp32(1/127)`` (1 for an all-zero row), codes ``x / scale`` rounded half to
    even and clipped to +-127."""
    scales = jnp.max(jnp.abs(x), axis=-1) * INT8_STEP
    scales = jnp.where(scales > 0, scales, 1.0)
    return jnp.clip(jnp.round(x / scales[:, None]), -127, 127).astype(jnp.int8), scales


def int8_tables(tables: jax.Array, scales: Any, n: int) -> tuple[jax.Array, jax.Array]:
    """Each group's table to int8 by its absmax (``tables ~ codes * t_scale[:, None]``), and the
    scale each output applies after the integer sum: its group's ``t_scale`` times its row scale."""
    tables = tables.astype(jnp.float32)
    t_scales = jnp.max(jnp.abs(tables), axis=-1) * INT8_STEP
    t_scales = jnp.where(t_scales > 0, t_scales, 1.0)
    codes = jnp.round(tables / t_scales[:, None]).astype(jnp.int8)
    col_scales = jnp.repeat(t_scales, n // tables.shape[0])
    return codes, col_scales if scales is None else col_scales * scales.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _int8_matmul(x: jax.Array, indices: jax.Array, tables: jax.Array, scales: Any, bits: int) -> jax.Array:
    """``x @ W`` with x and the tables in int8: native on CPUs, else an int8 XLA dot; the same int32
    sums either way, then ``* x_scale[m] * col_scale[n]`` in that order."""
    from afmkit import kernels

    n = indices.shape[0] * indices.shape[3]
    if (n // tables.shape[0]) % TILE == 0 and kernels.on_cpu():  # the kernel quantizes as below
        return kernels.palettized_matmul(x, indices, tables, scales, bits=bits, int8_activations=True)
    x_codes, x_scales = quantize_rows(x)
    t_codes, col_scales = int8_tables(tables, scales, n)
    group = jnp.arange(n) // (n // tables.shape[0])
    weights = t_codes.reshape(-1)[group[None, :] * 2**bits + unpack_codes(indices, bits, jnp)]
    sums = jax.lax.dot(x_codes, weights, preferred_element_type=jnp.int32)
    return sums.astype(jnp.float32) * x_scales[:, None] * col_scales[None, :]


def _int8_matmul_fwd(x: jax.Array, indices: jax.Array, tables: jax.Array, scales: Any, bits: int) -> Any:
    return _int8_matmul(x, indices, tables, scales, bits), (x, indices, tables, scales)


_int8_matmul.defvjp(_int8_matmul_fwd, _xla_gradients)  # straight through: the fp32 matmul's gradients


def is_palettized(params: Any) -> bool:
    return any(
        isinstance(w, PalettizedWeight)
        for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, PalettizedWeight))
    )
