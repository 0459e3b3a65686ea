"""Logical axis names to mesh axes: the rule table (data) and a strict resolver.

Model code names the axes of every weight (``model.transformer.logical_axes``) and of the
activations it pins (``sharding.activations.constrain``); it never names devices. The table
below says which mesh axes shard each logical axis. The resolver is strict where MaxText is
lenient: a logical name without a rule, a mesh axis claimed by two dimensions of one array, or a
dimension that its mesh axes do not divide is an error naming the array, the dimension and the
mesh axis, never a silent replication.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from jax.sharding import Mesh, PartitionSpec

from afmkit.errors import UserError

Rules = Mapping[str, tuple[str, ...]]

# Logical axis -> the mesh axes that shard it (empty: replicated). FSDP shards every weight's
# embedding dimension (and so the optimizer state, which has the weights' shapes); tensor
# parallelism splits heads, the FFN and the vocabulary; data and fsdp together split the batch;
# ``seq`` splits activations along the sequence.
LOGICAL_AXIS_RULES: Rules = {
    # weights
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    # activations
    "batch": ("data", "fsdp"),
    "seq": ("seq",),
    "act_embed": (),  # the residual stream is whole on each device (sharded by batch and seq)
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    # keys and values are gathered along the sequence, so every query sees every key: attention
    # stays exact under sequence parallelism
    "kv_seq": (),
    "microbatch": (),  # the gradient-accumulation index
}


def resolve(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    *,
    rules: Rules = LOGICAL_AXIS_RULES,
    name: str = "array",
) -> PartitionSpec:
    """The ``PartitionSpec`` of an array of ``shape`` whose dimensions are named ``axes``.

    ``None`` in ``axes`` means replicated. Mesh axes of size 1 are left out of the spec.
    """
    if len(axes) != len(shape):
        raise UserError(f"{name}: {len(axes)} logical axes {tuple(axes)} for a {len(shape)}-d array {tuple(shape)}")
    claimed: dict[str, str] = {}
    entries: list[str | tuple[str, ...] | None] = []
    for logical, dim in zip(axes, shape):
        if logical is None:
            entries.append(None)
            continue
        if logical not in rules:
            raise UserError(
                f"{name}: logical axis {logical!r} has no sharding rule; add it to "
                f"afmkit.sharding.rules.LOGICAL_AXIS_RULES (known: {', '.join(rules)})"
            )
        mesh_axes = tuple(rules[logical])
        for mesh_axis in mesh_axes:
            if mesh_axis not in mesh.shape:
                raise UserError(
                    f"{name}: the rule for {logical!r} names mesh axis {mesh_axis!r}, which the mesh "
                    f"({', '.join(mesh.axis_names)}) does not have"
                )
            if mesh_axis in claimed:
                raise UserError(
                    f"{name}: mesh axis {mesh_axis!r} is claimed by both logical axes {claimed[mesh_axis]!r} "
                    f"and {logical!r} of one array; one mesh axis can shard only one dimension"
                )
            claimed[mesh_axis] = logical
        used = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in used)
        if dim % ways:
            sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in used)
            raise UserError(
                f"{name}: dimension {logical!r} of size {dim} cannot be split {ways} ways over mesh axes {sizes}; "
                f"choose a mesh whose {'/'.join(used)} size divides {dim}"
            )
        entries.append(None if not used else used[0] if len(used) == 1 else used)
    while entries and entries[-1] is None:  # P("x", None) == P("x"): keep printed plans short
        entries.pop()
    return PartitionSpec(*entries)
