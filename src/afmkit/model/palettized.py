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

``linear`` multiplies by it through XLA on the dequantized matrix (fp32 table values, fp32
accumulation). Adapters add their update on top of the result, as on any base weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.errors import UserError

TILE = 16  # outputs per tile of indices
CODES_PER_WORD = 8  # inputs whose codes share one word of ``bits`` bytes
BITS = (2, 3, 4, 8)


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
    tiles, blocks, _, lanes = indices.shape
    mask = 2**bits - 1
    if bits == 8:
        codes = indices.astype(xp.int32)  # one byte per code: [N/16, K/8, 8, 16]
    else:
        planes = indices.astype(xp.uint32)
        words = sum(planes[:, :, q, :] << (8 * q) for q in range(bits))  # [N/16, K/8, 16]
        codes = xp.stack([(words >> (bits * p)) & mask for p in range(CODES_PER_WORD)], axis=2).astype(xp.int32)
    # [N/16, K/8, 8, 16] -> [K, N]
    return codes.transpose(1, 2, 0, 3).reshape(blocks * CODES_PER_WORD, tiles * lanes)


def _dequantize(indices: Any, tables: Any, scales: Any, bits: int, xp: Any) -> Any:
    codes = unpack_codes(indices, bits, xp)  # [K, N]
    n = codes.shape[1]
    groups, entries = tables.shape
    group = xp.arange(n) // (n // groups)
    values = tables.astype(xp.float32).reshape(-1)[group[None, :] * entries + codes]
    return values if scales is None else values * scales.astype(xp.float32)[None, :]


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
    The matrix is expanded by XLA and multiplied in fp32; gradients reach ``x`` (adapters trained
    on a palettized base) and the tables, never the integer indices."""
    n_in = len(weight.in_axes)
    if x.shape[x.ndim - n_in :] != tuple(weight.shape[a] for a in weight.in_axes):
        raise ValueError(f"input {x.shape} does not match palettized weight {weight.shape} (in_axes {weight.in_axes})")
    lead = x.shape[: x.ndim - n_in]
    y = jnp.dot(x.reshape(-1, weight.k).astype(jnp.float32), weight.matrix())
    return y.reshape(*lead, *(weight.shape[a] for a in weight.out_axes))


def is_palettized(params: Any) -> bool:
    return any(
        isinstance(w, PalettizedWeight)
        for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, PalettizedWeight))
    )
