"""Packed weights: 4- or 8-bit codes in blocks of 32 inputs, with an fp16 scale and offset each.

A ``PackedWeight`` stands in for a matrix in the weight pytree. On CPUs ``linear`` multiplies by
it with afmkit's native kernel (``afmkit.kernels``), which expands the codes in registers: a
decode step reads 4-5 bits per weight instead of 32, and prefill gets the CPU's bf16 dot products
where it has them. Elsewhere (accelerators, no C++ compiler) the weight is dequantized by XLA.

4-bit codes are unsigned with a per-block offset (``w = q * d + m``, as GGUF's Q4_1); 8-bit
codes are signed without one (``w = q * d``, as GGUF's Q8_0). Quantizing weights that came from
such a GGUF block gives back its exact codes, so packing SmolLM2's GGUF (Q4_1 matrices, a Q8_0
embedding) is lossless. The memory layout is described in ``kernels/cpu_kernels.cc``.
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

TILE = 16  # outputs per tile
BLOCK = 32  # inputs per scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight of logical ``shape`` whose ``in_axes`` are contracted with the input."""

    packed: jax.Array  # uint8 [N / 16, K / 32, 16, 16 (4-bit) or 32 (8-bit)]
    scales: jax.Array  # fp16 [N / 16, K / 32, 2, 16]: scale then offset of each output
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

    def matrix(self) -> jax.Array:
        """The dequantized ``[K, N]`` matrix (inputs by outputs), fp32."""
        return _unpack(self.packed, self.scales, self.bits, jnp)

    def dequantize(self) -> jax.Array:
        """The dequantized weight in its logical shape and axis order, fp32."""
        ins, outs = self.in_axes, self.out_axes
        w = self.matrix().reshape([self.shape[a] for a in ins + outs])
        return w.transpose(np.argsort(ins + outs))

    def rows(self, index: jax.Array) -> jax.Array:
        """Dequantized output rows (an embedding lookup): ``[*index.shape, K]``, fp32."""
        tiles = _unpack_tiles(self.packed[index // TILE], self.scales[index // TILE], self.bits, jnp)
        # tiles: [*index, K, 16]; pick each index's lane
        lane = (index % TILE)[..., None, None]
        return jnp.take_along_axis(tiles, jnp.broadcast_to(lane, (*tiles.shape[:-1], 1)), axis=-1)[..., 0]


def packable(shape: tuple[int, ...], in_axes: tuple[int, ...]) -> bool:
    k = math.prod(shape[a] for a in in_axes)
    n = math.prod(s for a, s in enumerate(shape) if a not in in_axes)
    return k % BLOCK == 0 and n % TILE == 0


def pack(weight: Any, bits: int, in_axes: tuple[int, ...] = (0,)) -> PackedWeight:
    """Quantize a weight to ``bits`` (4 or 8) in blocks of 32 along its contracted axes."""
    if bits not in (4, 8):
        raise UserError(f"packed weights have 4 or 8 bits, not {bits}")
    w = np.asarray(weight, dtype=np.float32)
    shape = tuple(w.shape)
    if not packable(shape, in_axes):
        raise UserError(
            f"a weight of shape {shape} cannot be packed: its inputs must be a multiple of {BLOCK} "
            f"and its outputs of {TILE}"
        )
    outs = tuple(a for a in range(w.ndim) if a not in in_axes)
    matrix = w.transpose(in_axes + outs).reshape(math.prod(shape[a] for a in in_axes), -1)  # [K, N]
    k, n = matrix.shape
    blocks = matrix.reshape(k // BLOCK, BLOCK, n)
    if bits == 4:
        low, high = blocks.min(axis=1), blocks.max(axis=1)
        scale, offset = _fp16((high - low) / 15), _fp16(low)
        codes = np.rint((blocks - offset[:, None]) / _nonzero(scale)[:, None])
        codes = np.clip(codes, 0, 15).astype(np.uint8)
    else:
        scale = _fp16(np.abs(blocks).max(axis=1) / 127)
        offset = np.zeros_like(scale)
        codes = np.clip(np.rint(blocks / _nonzero(scale)[:, None]), -127, 127).astype(np.int8).view(np.uint8)
    # codes [K/32, 32, N] -> [N/16 tiles, K/32, 16 pairs, 2 (k, k + 1), 16 outputs]
    kb, tiles = k // BLOCK, n // TILE
    codes = codes.reshape(kb, BLOCK // 2, 2, tiles, TILE).transpose(3, 0, 1, 2, 4)
    packed = codes[..., 0, :] | (codes[..., 1, :] << 4) if bits == 4 else codes.reshape(tiles, kb, BLOCK // 2, 2 * TILE)
    scales = np.stack([scale, offset], axis=1).reshape(kb, 2, tiles, TILE).transpose(2, 0, 1, 3)
    return PackedWeight(
        packed=jnp.asarray(np.ascontiguousarray(packed)),
        scales=jnp.asarray(np.ascontiguousarray(scales)),
        bits=bits,
        shape=shape,
        in_axes=tuple(in_axes),
    )


def _fp16(a: np.ndarray) -> np.ndarray:
    if np.any(np.abs(a) > np.finfo(np.float16).max):
        raise UserError("a weight is too large for fp16 block scales; keep this model in float32")
    return a.astype(np.float16)


def _nonzero(scale: np.ndarray) -> np.ndarray:
    """A constant block has scale 0: divide by 1 there (all its codes become 0 / its offset)."""
    s = scale.astype(np.float32)
    return np.where(s == 0, 1.0, s)


def _unpack_tiles(packed: Any, scales: Any, bits: int, xp: Any) -> Any:
    """Dequantize tiles ``[..., K/32, 16, bytes]`` to ``[..., K, 16]`` (fp32)."""
    lead = packed.shape[:-3]
    kb = packed.shape[-3]
    if bits == 4:
        codes = xp.stack([packed & 15, packed >> 4], axis=-2)
    else:
        codes = packed.view(np.int8) if xp is np else jax.lax.bitcast_convert_type(packed, jnp.int8)
    # [..., kb, pair, k parity, 16] -> [..., kb, 32, 16]
    codes = codes.reshape(*lead, kb, BLOCK, TILE).astype(xp.float32)
    scales = scales.astype(xp.float32)
    w = codes * scales[..., None, 0, :] + scales[..., None, 1, :]
    return w.reshape(*lead, kb * BLOCK, TILE)


def _unpack(packed: Any, scales: Any, bits: int, xp: Any) -> Any:
    tiles = _unpack_tiles(packed, scales, bits, xp)  # [N/16, K, 16]
    return xp.moveaxis(tiles, 0, 1).reshape(tiles.shape[1], -1)


def unpack_numpy(weight: PackedWeight) -> np.ndarray:
    """The dequantized ``[K, N]`` matrix computed in numpy (an independent check of the kernel)."""
    return _unpack(np.asarray(weight.packed), np.asarray(weight.scales), weight.bits, np)


def packed_matmul(x: jax.Array, weight: PackedWeight) -> jax.Array:
    """``x [M, K] @ W [K, N]``, fp32 out.

    On CPUs, the native kernel. Where the CPU has AVX512-BF16 it multiplies the exact codes by x
    rounded to bf16 (fp32 accumulation, scales applied in fp32): twice the arithmetic rate of fp32
    FMAs, and a rounding far below the weights' own 4- or 8-bit quantization (llama.cpp rounds
    activations to 8 bits here). Otherwise it works in fp32, its prefill GEMM as fast as an fp32
    model's (docs/benchmarks.md) and faster than dequantizing for XLA. Either way each row is
    computed in the same order whatever the batch, so a row's result does not depend on its batch.
    Elsewhere (accelerators, no compiler) the weight is dequantized and multiplied by XLA in fp32."""
    from afmkit import kernels

    x = x.astype(jnp.float32)
    if kernels.on_cpu():
        return _native_matmul(x, weight.packed, weight.scales, (weight.bits, weight.n, kernels.has_bf16()))
    return jnp.dot(x, weight.matrix())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, how: tuple[int, int, bool]) -> jax.Array:
    from afmkit import kernels

    bits, n, bf16 = how
    return kernels.packed_matmul(x, packed, scales, bits=bits, n=n, bf16=bf16)


def _native_matmul_fwd(x: jax.Array, packed: jax.Array, scales: jax.Array, how: tuple[int, int, bool]) -> Any:
    return _native_matmul(x, packed, scales, how), (packed, scales)


def input_gradient(grad: jax.Array, weight_t: jax.Array, bf16: bool) -> jax.Array:
    """``grad [M, N] @ weight_t [N, K]`` (``weight_t``: a ``[K, N]`` weight transposed), fp32 out:
    the gradient that reaches a quantized linear's input in training. With ``bf16`` (a CPU with
    AVX512-BF16, as the forward kernels decide) both are rounded to bf16 and summed in fp32, which
    XLA's CPU backend runs faster than fp32 (a LoRA step 1.19-1.31x, `benchmarks/train_step.py`);
    the rounding (2^-8 of each factor) is that of the forward kernels' bf16 inputs, far below the
    weight's own quantization. XLA takes the bf16 path only for a ``weight_t`` made in ``[N, K]`` order, not
    for a transposed ``[K, N]`` matrix (that it multiplies in fp32 after rounding)."""
    if bf16:
        return jnp.dot(grad.astype(jnp.bfloat16), weight_t.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return grad @ weight_t


def _unpack_transposed(packed: Any, scales: Any, bits: int) -> jax.Array:
    """The dequantized ``[N, K]`` matrix (``_unpack``'s transposed), made in that order."""
    tiles = _unpack_tiles(packed, scales, bits, jnp)  # [N/16, K, 16]
    return jnp.swapaxes(tiles, 1, 2).reshape(-1, tiles.shape[1])


def _native_matmul_bwd(how: tuple[int, int, bool], saved: Any, grad: jax.Array) -> Any:
    """Gradients reach ``x`` (adapters trained on a packed base), never the frozen codes."""
    packed, scales = saved
    return input_gradient(grad, _unpack_transposed(packed, scales, how[0]), how[2]), None, None


_native_matmul.defvjp(_native_matmul_fwd, _native_matmul_bwd)


def packed_linear(x: jax.Array, weight: PackedWeight) -> jax.Array:
    """``x``'s trailing axes contracted with the weight's ``in_axes``, as ``linear`` does."""
    n_in = len(weight.in_axes)
    if x.shape[x.ndim - n_in :] != tuple(weight.shape[a] for a in weight.in_axes):
        raise ValueError(f"input {x.shape} does not match packed weight {weight.shape} (in_axes {weight.in_axes})")
    lead = x.shape[: x.ndim - n_in]
    y = packed_matmul(x.reshape(-1, weight.k), weight)
    return y.reshape(*lead, *(weight.shape[a] for a in weight.out_axes))


# Which axes of each weight are contracted with the input (see ``transformer.weight_specs``).
INPUT_AXES = {
    "wq": (0,),
    "wk": (0,),
    "wv": (0,),
    "wo": (0, 1),
    "w_gate": (0,),
    "w_up": (0,),
    "w_down": (0,),
    "embed": (1,),  # [vocab, d]: as the output layer it contracts d
    "lm_head": (0,),
}


def pack_leaf(name: str, weight: Any, *, bits: int, embed_bits: int = 8) -> Any:
    """One weight of a pytree, by its name (``layers.3.wq``, ``embed``): a packable matrix
    becomes a ``PackedWeight`` (``embed_bits`` for the embedding and an untied output layer,
    ``bits`` for the rest); anything else (norm scales, shapes that do not tile) stays fp32."""
    kind = name.rsplit(".", 1)[-1]
    if kind not in INPUT_AXES or not packable(tuple(weight.shape), INPUT_AXES[kind]):
        return jnp.asarray(weight, jnp.float32)
    return pack(weight, embed_bits if kind in ("embed", "lm_head") else bits, INPUT_AXES[kind])


def pack_params(params: dict[str, Any], *, bits: int, embed_bits: int = 8) -> dict[str, Any]:
    """The weights with every matrix packed (see ``pack_leaf``)."""
    packed = {
        name: pack_leaf(name, w, bits=bits, embed_bits=embed_bits) for name, w in params.items() if name != "layers"
    }
    packed["layers"] = [
        {name: pack_leaf(name, w, bits=bits, embed_bits=embed_bits) for name, w in layer.items()}
        for layer in params["layers"]
    ]
    return packed


def dequantize_params(params: Any) -> Any:
    """The weights with every ``PackedWeight`` (and ``PalettizedWeight``) replaced by the fp32
    values it holds (exactly)."""
    from afmkit.model.palettized import PalettizedWeight

    quantized = (PackedWeight, PalettizedWeight)
    return jax.tree.map(
        lambda w: w.dequantize() if isinstance(w, quantized) else w,
        params,
        is_leaf=lambda w: isinstance(w, quantized),
    )


def is_packed(params: dict[str, Any]) -> bool:
    return any(
        isinstance(w, PackedWeight) for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, PackedWeight))
    )
