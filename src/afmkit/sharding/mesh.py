"""A device mesh with the named axes ``data``, ``fsdp``, ``seq`` and ``tensor``.

A spec string names the sizes of some axes (``data=2,fsdp=2,tensor=2``); the others are 1. One
axis may be ``-1``: it takes whatever devices remain. The product must equal the device count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from afmkit.errors import UserError

MESH_AXES = ("data", "fsdp", "seq", "tensor")


def parse_mesh_spec(spec: str | None, *, device_count: int) -> dict[str, int]:
    """Axis sizes from a spec string; ``None`` or ``""`` puts every device on ``data``."""
    if not spec:
        return {axis: (device_count if axis == "data" else 1) for axis in MESH_AXES}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise UserError(
                f"bad mesh spec {spec!r}: {part.strip()!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)} "
                "(example: data=2,fsdp=2,tensor=2)"
            )
        if name in sizes:
            raise UserError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise UserError(f"bad mesh spec {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if size == 0 or size < -1:
            raise UserError(f"bad mesh spec {spec!r}: size of {name!r} must be positive or -1 (the rest)")
        sizes[name] = size
    wildcards = [name for name, size in sizes.items() if size == -1]
    if len(wildcards) > 1:
        raise UserError(f"bad mesh spec {spec!r}: only one axis may be -1, got {', '.join(wildcards)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if wildcards:
        if device_count % fixed:
            raise UserError(
                f"mesh {spec!r}: the fixed axes use {fixed} devices, which does not divide the "
                f"{device_count} devices available; choose sizes whose product divides {device_count}"
                + (
                    ", or, on a CPU, simulate more devices with XLA_FLAGS=--xla_force_host_platform_device_count=N"
                    if fixed > device_count
                    else ""
                )
            )
        sizes[wildcards[0]] = device_count // fixed
    elif fixed != device_count:
        raise UserError(
            f"mesh {spec!r} needs {fixed} devices but {device_count} are available; "
            f"make the sizes multiply to {device_count} (or use -1 for one axis), or, on a CPU, simulate "
            f"{fixed} devices by starting with XLA_FLAGS=--xla_force_host_platform_device_count={fixed}"
        )
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec: str | None = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: every device of every process) from a spec string.

    Devices are laid out in ``jax.devices()`` order with ``tensor`` varying fastest, so tensor
    parallel groups sit on neighbouring devices (same host on a cluster).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, device_count=len(devices))
    grid = np.array(devices, dtype=object).reshape([sizes[axis] for axis in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def describe(mesh: Mesh) -> str:
    return ",".join(f"{axis}={size}" for axis, size in mesh.shape.items())
