"""A preallocated key/value cache: one K and one V buffer per layer. Keys are stored
``[batch, kv_heads, head_dim, capacity]`` and values ``[batch, kv_heads, capacity, head_dim]``,
the layouts the attention matmuls read without transposing. Steps write into it in place (the
engine donates it to each jitted step)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from afmkit.config import ModelConfig


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
