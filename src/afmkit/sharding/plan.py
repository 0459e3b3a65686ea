"""Where every weight lives on a mesh, and what each device holds.

``param_specs`` resolves each weight's logical axes (``model.transformer.logical_axes``) through
the rule table. ``memory_per_device`` counts the bytes one device stores for the weights and the
optimizer state from shapes alone, so a plan for ``afm-on-device`` on a simulated mesh costs
nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from afmkit.config import ModelConfig
from afmkit.model.transformer import WeightSpec, weight_specs
from afmkit.sharding.rules import LOGICAL_AXIS_RULES, Rules, resolve

# fp32 slots per weight element kept by each optimizer (AdamW: first and second moments; AFM's
# RMSProp variant: the squared-gradient EMA and the momentum EMA).
OPTIMIZER_SLOTS = {"adamw": 2, "afm": 2, "sgd": 0}


def _path_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def param_specs(config: ModelConfig, mesh: Mesh, *, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """A pytree shaped like the weights holding each weight's ``PartitionSpec``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, s: resolve(s.axes, s.shape, mesh, rules=rules, name=f"weight {_path_name(path)}"),
        weight_specs(config),
        is_leaf=lambda x: isinstance(x, WeightSpec),
    )


def param_shardings(config: ModelConfig, mesh: Mesh, *, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(config, mesh, rules=rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_fraction(spec: PartitionSpec, mesh: Mesh) -> int:
    """How many ways an array with ``spec`` is split (its per-device share is 1/this)."""
    ways = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            ways *= mesh.shape[axis]
    return ways


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    spec: PartitionSpec
    ways: int  # number of shards
    bytes_per_device: int  # fp32 weight


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    mesh_shape: dict[str, int]
    weights: list[WeightPlan]
    weight_bytes_per_device: int
    optimizer_bytes_per_device: int
    optimizer: str

    @property
    def total_bytes_per_device(self) -> int:
        return self.weight_bytes_per_device + self.optimizer_bytes_per_device


def shard_plan(
    config: ModelConfig, mesh: Mesh, *, optimizer: str = "adamw", rules: Rules = LOGICAL_AXIS_RULES
) -> ShardPlan:
    """Every weight's spec and the per-device bytes of fp32 weights and optimizer state.

    Layers are identical, so the plan lists layer 0's weights once as ``layers/*/...``.
    """
    specs = param_specs(config, mesh, rules=rules)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    flat_weights = jax.tree.leaves(weight_specs(config), is_leaf=lambda x: isinstance(x, WeightSpec))
    weights, total = [], 0
    for (path, spec), weight in zip(flat_specs, flat_weights):
        ways = shard_fraction(spec, mesh)
        per_device = math.prod(weight.shape) * 4 // ways
        total += per_device
        name = _path_name(path)
        if name.startswith("layers/"):
            if not name.startswith("layers/0/"):
                continue
            name = "layers/*/" + name.removeprefix("layers/0/")
        weights.append(WeightPlan(name, weight.shape, weight.axes, spec, ways, per_device))
    return ShardPlan(
        mesh_shape=dict(mesh.shape),
        weights=weights,
        weight_bytes_per_device=total,
        optimizer_bytes_per_device=total * OPTIMIZER_SLOTS[optimizer],
        optimizer=optimizer,
    )
