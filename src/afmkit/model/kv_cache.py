"""Key/value caches, one K and one V buffer per layer.

``KVCache`` (contiguous): every row owns ``capacity`` positions. Keys are stored
``[batch, kv_heads, head_dim, capacity]`` and values ``[batch, kv_heads, capacity, head_dim]``,
the layouts the attention matmuls read without transposing. Steps write into it in place (the
engine donates it to each jitted step).

``PagedKVCache`` (vLLM's design): one pool of fixed-size blocks of ``page`` positions shared by
all rows, keys ``[blocks, kv_heads, head_dim, page]`` and values ``[blocks, kv_heads, page,
head_dim]``, and a block table per row (``tables [rows, blocks_per_row]``): position ``p`` of row
``b`` lives at offset ``p % page`` of block ``tables[b, p // page]``. Memory follows the tokens
in flight, not rows times the longest context. A table entry of ``UNALLOCATED`` (or any index
past the pool) is no block: writes to it are dropped and reads give zeros, so a row that is
not running (or the padding of a chunk) can never touch another row's blocks.

With ``quantized`` pools the blocks hold int8 codes and one fp32 scale per (position, KV head):
``x = code * scale``, ``scale = max|x| / 127`` over head_dim, so each head keeps its own range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from afmkit.config import ModelConfig

UNALLOCATED = 2**30  # a block-table entry past any pool: writes dropped, reads zero


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list[jax.Array]
    v: list[jax.Array]

    @classmethod
    def zeros(cls, config: ModelConfig, *, batch: int, capacity: int, dtype: Any = jnp.float32) -> KVCache:
        k_shape = (batch, config.n_kv_heads, config.head_dim, capacity)
        v_shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        return cls(
            k=[jnp.zeros(k_shape, dtype) for _ in range(config.n_layers)],
            v=[jnp.zeros(v_shape, dtype) for _ in range(config.n_layers)],
        )

    def layers(self) -> list[tuple[jax.Array, jax.Array]]:
        return list(zip(self.k, self.v))

    def with_layers(self, layers: list[tuple[jax.Array, jax.Array]]) -> KVCache:
        return KVCache(k=[k for k, _ in layers], v=[v for _, v in layers])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedLayer:
    """One layer's block pool and the block tables of the rows a call runs."""

    k: jax.Array  # [blocks, KV, D, page]
    v: jax.Array  # [blocks, KV, page, D]
    k_scale: jax.Array | None  # [blocks, KV, page] when quantized
    v_scale: jax.Array | None
    tables: jax.Array  # [B, blocks_per_row] int32

    @property
    def page(self) -> int:
        return self.k.shape[-1]

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> PagedLayer:
        """Store ``k, v [B, T, KV, D]`` at ``positions [B, T]`` of each row."""
        rows = jnp.arange(positions.shape[0])[:, None]
        block = self.tables.at[rows, positions // self.page].get(mode="fill", fill_value=UNALLOCATED)
        offset = positions % self.page
        k_scale, v_scale = self.k_scale, self.v_scale
        if k_scale is not None:
            k, ks = quantize_int8(k)
            v, vs = quantize_int8(v)
            k_scale = k_scale.at[block, :, offset].set(ks, mode="drop")
            v_scale = v_scale.at[block, :, offset].set(vs, mode="drop")
        # Advanced indices on dims 0 and 3 (or 0 and 2) put [B, T] first: the update is [B, T, KV, D].
        k_pool = self.k.at[block, :, :, offset].set(k.astype(self.k.dtype), mode="drop")
        v_pool = self.v.at[block, :, offset].set(v.astype(self.v.dtype), mode="drop")
        return PagedLayer(k_pool, v_pool, k_scale, v_scale, self.tables)

    def _blocks(self, attend_len: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """The blocks covering each row's first ``attend_len`` positions as the pool lays them
        out, keys ``[B, n, KV, D, page]`` and values ``[B, n, KV, page, D]`` (zeros for no block)."""
        n = -(-attend_len // self.page)
        tables = self.tables[:, :n]
        if tables.shape[1] < n:  # the table is narrower than the read: the rest is unallocated
            pad = jnp.full((tables.shape[0], n - tables.shape[1]), UNALLOCATED, tables.dtype)
            tables = jnp.concatenate([tables, pad], axis=1)
        keys = self.k.at[tables].get(mode="fill", fill_value=0).astype(dtype)
        values = self.v.at[tables].get(mode="fill", fill_value=0).astype(dtype)
        if self.k_scale is not None:
            keys = keys * self.k_scale.at[tables].get(mode="fill", fill_value=0)[:, :, :, None, :].astype(dtype)
            values = values * self.v_scale.at[tables].get(mode="fill", fill_value=0)[..., None].astype(dtype)
        return keys, values

    def decode_attention(self, q: jax.Array, lengths: jax.Array, attend_len: int) -> jax.Array:
        """Softmax attention (scores scaled by ``1 / sqrt(D)``) of one query per row, ``q [B, KV,
        G, D]``, over the first ``lengths[b]`` positions of each row (XLA; the CPU kernel is
        ``kernels.paged_decode_attention``).
        The blocks are gathered but scored where they land, block by block, without the copy
        into the contiguous layout that ``read`` makes."""
        rows = dataclasses.replace(self, tables=self.tables[: q.shape[0]])  # the table may have spare lines
        keys, values = rows._blocks(attend_len, q.dtype)  # [B, n, KV, D, page], [B, n, KV, page, D]
        n, page = keys.shape[1], keys.shape[-1]
        scores = jnp.einsum("bkgd,bnkdp->bkgnp", q, keys).astype(jnp.float32) / math.sqrt(q.shape[-1])
        positions = (jnp.arange(n)[:, None] * page + jnp.arange(page)[None, :])[None]  # [1, n, page]
        visible = positions < lengths[:, None, None]
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        shape = scores.shape
        probs = jax.nn.softmax(scores.reshape(*shape[:3], n * page), axis=-1).reshape(shape).astype(values.dtype)
        return jnp.einsum("bkgnp,bnkpd->bkgd", probs, values)

    def read(self, attend_len: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """The first ``attend_len`` positions of every row, as the contiguous cache lays them out:
        keys ``[B, KV, D, attend_len]`` and values ``[B, KV, attend_len, D]`` in ``dtype``."""
        keys, values = self._blocks(attend_len, dtype)
        batch, n, kv, dim, page = keys.shape
        keys = keys.transpose(0, 2, 3, 1, 4).reshape(batch, kv, dim, n * page)[..., :attend_len]
        values = values.transpose(0, 2, 1, 3, 4).reshape(batch, kv, n * page, dim)[:, :, :attend_len]
        return keys, values


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [..., D]`` as int8 codes and one fp32 scale per vector: ``x ~ code * scale``; the
    rounding error is at most ``scale / 2 = max|x| / 254`` per element."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(x / safe[..., None]), -127, 127).astype(jnp.int8)
    return codes, scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """The block pools of every layer; ``tables`` is set per call (None while the pool is held)."""

    k: list[jax.Array]
    v: list[jax.Array]
    k_scale: list[jax.Array]  # empty unless quantized
    v_scale: list[jax.Array]
    tables: jax.Array | None = None

    @classmethod
    def zeros(
        cls,
        config: ModelConfig,
        *,
        blocks: int,
        page: int,
        dtype: Any = jnp.float32,
        quantized: bool = False,
        zeros: Any = jnp.zeros,
    ) -> PagedKVCache:
        """An empty pool; ``zeros(shape, dtype)`` makes each array (``kernels.lazy_zeros``: memory
        committed as blocks are first written)."""
        kv, dim, layers = config.n_kv_heads, config.head_dim, config.n_layers
        store = jnp.int8 if quantized else dtype
        return cls(
            k=[zeros((blocks, kv, dim, page), store) for _ in range(layers)],
            v=[zeros((blocks, kv, page, dim), store) for _ in range(layers)],
            k_scale=[zeros((blocks, kv, page), jnp.float32) for _ in range(layers)] if quantized else [],
            v_scale=[zeros((blocks, kv, page), jnp.float32) for _ in range(layers)] if quantized else [],
        )

    @property
    def n_blocks(self) -> int:
        return self.k[0].shape[0]

    def layers(self) -> list[PagedLayer]:
        scales = zip(self.k_scale, self.v_scale) if self.k_scale else [(None, None)] * len(self.k)
        return [PagedLayer(k, v, ks, vs, self.tables) for k, v, (ks, vs) in zip(self.k, self.v, scales)]

    def with_layers(self, layers: list[PagedLayer]) -> PagedKVCache:
        quantized = bool(self.k_scale)
        return PagedKVCache(
            k=[layer.k for layer in layers],
            v=[layer.v for layer in layers],
            k_scale=[layer.k_scale for layer in layers] if quantized else [],
            v_scale=[layer.v_scale for layer in layers] if quantized else [],
            tables=self.tables,
        )


def bytes_per_position(config: ModelConfig, dtype: Any, *, quantized: bool = False) -> int:
    """Cache bytes one token takes over all layers (keys and values, scales included)."""
    per_head = config.head_dim * (1 if quantized else jnp.dtype(dtype).itemsize) + (4 if quantized else 0)
    return 2 * config.n_layers * config.n_kv_heads * per_head
