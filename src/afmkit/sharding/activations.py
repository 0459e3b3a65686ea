"""Activation sharding hooks: identity unless a training mesh is active.

The trainer traces its step inside ``with activation_sharding(mesh):``; while that context is
open, ``constrain(x, names)`` pins ``x`` to the layout its logical axis names resolve to on that
mesh (``jax.lax.with_sharding_constraint``). Inference never opens the context, so the same
model code runs unchanged there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from afmkit.sharding.rules import LOGICAL_AXIS_RULES, Rules, resolve

_active: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[None]:
    _active.append((mesh, rules))
    try:
        yield
    finally:
        _active.pop()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` with its layout pinned to the logical axes ``names`` (identity without a mesh)."""
    if not _active:
        return x
    mesh, rules = _active[-1]
    spec = resolve(names, x.shape, mesh, rules=rules, name=f"activation {tuple(names)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def ways_split(name: str, size: int) -> int:
    """Into how many pieces the active mesh splits a logical axis of ``size`` (1 without a mesh)."""
    if not _active:
        return 1
    mesh, rules = _active[-1]
    spec = resolve((name,), (size,), mesh, rules=rules, name=f"axis {name!r}")
    entry = spec[0] if len(spec) else None  # a spec leaves out trailing unsplit axes
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    ways = 1
    for axis in axes:
        ways *= mesh.shape[axis]
    return ways
