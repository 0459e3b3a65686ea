"""Pre-training runs (``afmkit pretrain --out DIR``) as models.

Any of these paths names a model:

* ``DIR`` or ``DIR/checkpoints``: the run's latest saved step;
* ``DIR/checkpoints/STEP``: that step.

``DIR/run.json`` holds the model config and the tokenizer the run was trained with (a model
name or a path); the weights come from the step's Orbax ``state`` item. Only the weights are
read (an Orbax partial restore, as numpy arrays): the optimizer state, twice the weights' size
for AdamW, stays on disk, and nothing is written, so a run that is still training can be read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from afmkit.config import ModelConfig
from afmkit.data.tokenizer import Tokenizer
from afmkit.errors import CorruptFileError, UserError
from afmkit.interop.native import leaf_name
from afmkit.model.transformer import Params, abstract_params

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
STATE_ITEM = "state"  # the item name ``afmkit.train.checkpoint.Checkpoints`` saves weights under


def find_run(path: str | os.PathLike) -> tuple[Path, int | None] | None:
    """``(run directory, step)`` if ``path`` names a training run (step None: the latest), else None."""
    path = Path(path).expanduser().absolute()
    if (path / RUN_FILE).is_file():
        return path, None
    if path.name == CHECKPOINTS and (path.parent / RUN_FILE).is_file():
        return path.parent, None
    if path.parent.name == CHECKPOINTS and (path.parent.parent / RUN_FILE).is_file():
        run = path.parent.parent
        if not path.name.isdigit():
            raise UserError(
                f"{path}: a checkpoint is named by its step number; use {run} for the latest or "
                f"{run / CHECKPOINTS}/<step> with one of: {_steps_text(run)}"
            )
        return run, int(path.name)
    return None


def saved_steps(run: Path) -> list[int]:
    """The run's complete checkpoint steps, oldest first (saves still in progress are left out)."""
    from orbax.checkpoint import path as ocp_path

    return sorted(ocp_path.step.checkpoint_steps(run / CHECKPOINTS))


def _steps_text(run: Path) -> str:
    steps = saved_steps(run)
    return ", ".join(map(str, steps)) if steps else "none saved yet"


def resolve_step(run: Path, step: int | None) -> int:
    """The step to load: ``step`` if saved, the latest if None; one-line errors otherwise."""
    steps = saved_steps(run)
    if not steps:
        raise UserError(
            f"training run {run} has no saved checkpoint yet; a step is saved every --save-every steps "
            "and at the end, so let it train further (or resume it with --resume)"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise UserError(
            f"training run {run} has no checkpoint for step {step}; saved steps: {', '.join(map(str, steps))} "
            "(older ones beyond --keep are deleted)"
        )
    return step


def read_run(run: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The run's model config and settings from ``run.json``."""
    try:
        record = json.loads((run / RUN_FILE).read_text())
        config = ModelConfig.from_dict(record["config"])
        settings = dict(record["settings"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"cannot read {run / RUN_FILE} ({exc}); the training run's record is damaged") from None
    return config, settings


def run_config(path: str | os.PathLike) -> ModelConfig:
    found = find_run(path)
    if found is None:
        raise UserError(f"{path} is not a training run (no {RUN_FILE})")
    resolve_step(*found)  # a path naming a step that was never saved is refused here too
    return read_run(found[0])[0]


def _tokenizer(run: Path, settings: dict[str, Any]) -> Tokenizer:
    if (run / "tokenizer.json").is_file():  # a run that keeps its own copy
        return Tokenizer.from_directory(run)
    from afmkit.data.tokenizer import load_tokenizer  # the same lookup pretrain used

    name = settings.get("tokenizer")
    try:
        return load_tokenizer(str(name))
    except UserError as exc:
        raise UserError(
            f"training run {run} was trained with the tokenizer {name!r}, which cannot be loaded now ({exc})"
        ) from None


def load_run(path: str | os.PathLike, *, convert: Any = None) -> tuple[ModelConfig, Params, Tokenizer, str]:
    """Config, weights, tokenizer and a display name (``RUN-stepN``) of a run's step.

    ``convert(name, numpy array)`` makes each weight (default: a float32 jax array)."""
    import orbax.checkpoint as ocp

    found = find_run(path)
    if found is None:
        raise UserError(f"{path} is not a training run (no {RUN_FILE})")
    run, step = found
    step = resolve_step(run, step)
    config, settings = read_run(run)
    abstract = abstract_params(config)
    numpy_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    state_dir = run / CHECKPOINTS / str(step) / STATE_ITEM
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item={"params": abstract}, restore_args={"params": numpy_args}, partial_restore=True
            ),
        )
    except Exception as exc:  # tensorstore / orbax raise many types on damaged or mismatched files
        text = " ".join(str(exc).split())[:300]
        raise CorruptFileError(
            f"cannot read the weights of step {step} in {run} ({type(exc).__name__}: {text}); "
            f"the checkpoint is damaged or does not match {RUN_FILE}'s config: load another step"
        ) from None

    def make(key_path: Any, spec: jax.ShapeDtypeStruct, value: np.ndarray) -> Any:
        name = leaf_name(key_path)
        if tuple(value.shape) != tuple(spec.shape):
            raise CorruptFileError(
                f"step {step} in {run}: weight {name} has shape {tuple(value.shape)}, the config needs {spec.shape}"
            )
        value = np.asarray(value, np.float32)
        return convert(name, value) if convert else jax.numpy.asarray(value)

    params = jax.tree_util.tree_map_with_path(make, abstract, restored["params"])
    return config, params, _tokenizer(run, settings), f"{run.name}-step{step}"
