"""Inference on a device mesh: the engine's weights and KV cache laid out by the trainer's table.

Weights take the specs ``plan.param_specs`` gives them (the same ``LOGICAL_AXIS_RULES`` the
trainer uses: heads, KV heads, the FFN and the vocabulary over ``tensor``; the embedding
dimension over ``fsdp``). The KV cache ``[rows, kv_heads, ...]`` splits its rows as the
activations' ``batch`` (``data`` and ``fsdp``) and its KV heads as ``act_kv_heads`` (``tensor``).
A paged pool ``[blocks, kv_heads, ...]`` splits only its KV heads. Jitted steps take these layouts as given and XLA partitions the rest (GSPMD), so a sharded step
computes what the unsharded one does, up to the order of float sums.

Packed (int4/int8) weights are laid out for afmkit's single-device CPU kernels and have no
logical axes here, so a mesh refuses them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.sharding.mesh import make_mesh
from afmkit.sharding.plan import param_shardings
from afmkit.sharding.rules import LOGICAL_AXIS_RULES, resolve

# The cache's dimensions as logical axes: rows, KV heads, then head_dim and positions (whole).
KV_CACHE_AXES = ("batch", "act_kv_heads", None, None)


def as_mesh(mesh: Mesh | str) -> Mesh:
    """A ``Mesh`` as given, or built from a spec string (``"tensor=2"``, as ``pretrain --mesh``)."""
    return mesh if isinstance(mesh, Mesh) else make_mesh(mesh)


def shard_weights(config: ModelConfig, params: Any, mesh: Mesh) -> Any:
    """``params`` placed on ``mesh`` by the rule table; a ``UserError`` naming the weight and the
    mesh axis when a dimension does not split evenly."""
    from afmkit.model.packed import is_packed

    if is_packed(params):
        raise UserError(
            "packed (int4/int8) weights run on one device only (afmkit's CPU kernels); "
            "load with dtype float32 or bfloat16 to use a mesh"
        )
    return jax.device_put(params, param_shardings(config, mesh))


def kv_cache_sharding(config: ModelConfig, mesh: Mesh, *, rows: int) -> NamedSharding:
    """The layout of a KV cache of ``rows`` rows (keys and values alike: both lead with
    ``[rows, kv_heads]``)."""
    shape = (rows, config.n_kv_heads, config.head_dim, 1)
    return NamedSharding(mesh, resolve(KV_CACHE_AXES, shape, mesh, name="KV cache"))


def paged_kv_sharding(config: ModelConfig, mesh: Mesh) -> tuple[tuple[int, NamedSharding], ...]:
    """The layouts of a paged KV pool's arrays by rank: blocks ``[blocks, kv_heads, ...]`` (4-D)
    and int8 scales ``[blocks, kv_heads, page]`` (3-D) split their KV heads as ``act_kv_heads``;
    blocks are whole on every device (any row's table may name any block)."""
    heads = resolve((None, "act_kv_heads"), (1, config.n_kv_heads), mesh, name="KV cache")[1]
    return (
        (4, NamedSharding(mesh, PartitionSpec(None, heads, None, None))),
        (3, NamedSharding(mesh, PartitionSpec(None, heads, None))),
    )


def row_multiple(mesh: Mesh | None) -> int:
    """How many ways the mesh splits a batch's rows (a decode batch's slot count is a multiple)."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[axis] for axis in LOGICAL_AXIS_RULES["batch"])
