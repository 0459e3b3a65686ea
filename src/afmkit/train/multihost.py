"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` when launched as several
processes.

The coordinator address, process count and process id come from, in order: the ``pretrain``
flags (``--coordinator``, ``--num-processes``, ``--process-id``), the environment variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or JAX's own cluster
detection (SLURM, Open MPI / mpirun, Cloud TPU pod slices, Kubernetes): afmkit recognises SLURM,
Open MPI and TPU pods from their environment variables, and ``--distributed`` asks JAX to detect
the cluster whatever it is. A single process with none of these runs without
``jax.distributed``.

This must run before anything touches a JAX device.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from afmkit.errors import UserError

# Environment variables that mean "this process is one of several", per cluster kind.
CLUSTER_MARKERS = {
    "SLURM": ("SLURM_JOB_ID", "SLURM_NTASKS"),
    "Open MPI": ("OMPI_COMM_WORLD_SIZE",),
    "Cloud TPU pod": ("TPU_WORKER_HOSTNAMES",),
}


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    source: str  # where the settings came from, for messages


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} must be an integer") from None


def _detected_cluster() -> str | None:
    for name, markers in CLUSTER_MARKERS.items():
        if all(os.environ.get(m) for m in markers):
            if name == "SLURM" and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
                continue
            if name == "Open MPI" and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) <= 1:
                continue
            if name == "Cloud TPU pod" and "," not in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
                continue
            return name
    return None


def settings(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    force: bool = False,
) -> DistributedSettings | None:
    """The distributed settings in effect, or ``None`` for a single process. ``force`` (the
    ``--distributed`` flag) means "several processes; let JAX detect the cluster" where no
    settings are given."""
    if coordinator or num_processes is not None or process_id is not None:
        source = "flags"
    else:
        coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
        num_processes = _env_int("JAX_NUM_PROCESSES")
        process_id = _env_int("JAX_PROCESS_ID")
        source = "environment"
        if not coordinator and num_processes is None and process_id is None:
            cluster = _detected_cluster() or ("JAX cluster detection" if force else None)
            return DistributedSettings(None, None, None, cluster) if cluster else None
    if num_processes is not None and num_processes == 1 and not coordinator:
        return None
    missing = [
        name
        for name, value in (
            ("--coordinator / JAX_COORDINATOR_ADDRESS", coordinator),
            ("--num-processes / JAX_NUM_PROCESSES", num_processes),
            ("--process-id / JAX_PROCESS_ID", process_id),
        )
        if value is None
    ]
    if missing:
        raise UserError(
            f"a multi-process launch (settings from {source}) also needs {', '.join(missing)}; give all three"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(f"process id {process_id} must lie in [0, {num_processes}) ({source})")
    return DistributedSettings(coordinator, num_processes, process_id, source)


_initialized = False


def initialize(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    force: bool = False,
) -> DistributedSettings | None:
    """Join the other processes (once per process); returns the settings used, or ``None``."""
    global _initialized
    found = settings(coordinator=coordinator, num_processes=num_processes, process_id=process_id, force=force)
    if found is None or _initialized:
        return found
    if found.coordinator is None:  # a detected cluster: JAX reads its own environment
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=found.coordinator, num_processes=found.num_processes, process_id=found.process_id
        )
    _initialized = True
    return found
