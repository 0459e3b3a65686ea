"""Training checkpoints with Orbax's ``CheckpointManager``.

A checkpoint step holds two items: ``state`` (weights, optimizer state, step, RNG; saved
sharded, restored onto whatever mesh the resuming run uses) and ``loader`` (the data loader's
position, JSON). Saves are asynchronous: ``save`` returns once the arrays are copied off the
devices, and Orbax writes into a temporary directory that it renames only when complete, so a
run killed mid-save leaves the previous checkpoints intact. The last ``keep`` steps are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from afmkit.errors import CorruptFileError, UserError


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True) -> None:
        if keep < 1:
            raise UserError(f"--keep must be at least 1, got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "loader"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, loader_state: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state)),
            force=True,
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Step ``step`` laid out like ``target`` (a pytree of ``jax.ShapeDtypeStruct`` with
        shardings), so a checkpoint from one mesh restores onto another."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore()),
            )
        except Exception as exc:
            if _is_mismatch(exc):
                raise UserError(
                    f"checkpoint step {step} in {self.directory} does not fit this run ({_short(exc)}); "
                    "it was saved for a different model size or optimizer: resume with the same --model "
                    "and --optimizer, or train into a new --out"
                ) from None
            # tensorstore / JSON / msgpack errors on damaged files
            raise CorruptFileError(
                f"checkpoint step {step} in {self.directory} cannot be read ({_short(exc)}); it is damaged: "
                "delete that step's directory to resume from an earlier one, or train into a new --out"
            ) from None
        _check_shapes(restored["state"], target, step=step, directory=self.directory)
        return restored["state"], dict(restored["loader"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _is_mismatch(exc: BaseException) -> bool:
    """Orbax's "the saved tree or shapes differ from the target" errors, as opposed to damage."""
    if isinstance(exc, json.JSONDecodeError) or not isinstance(exc, (ValueError, KeyError, TypeError)):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in ("do not match", "mismatch", "shape", "structure"))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _check_shapes(restored: Any, target: Any, *, step: int, directory: Path) -> None:
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        if tuple(got.shape) != tuple(want.shape):
            raise UserError(
                f"checkpoint step {step} in {directory} holds an array of shape {tuple(got.shape)} where this "
                f"run expects {tuple(want.shape)}: it was saved for a different model size"
            )
