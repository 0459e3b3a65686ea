"""afmkit's own checkpoint format: a directory holding

* ``afmkit.json``: format marker, version and the model config;
* ``model.safetensors``: weights, named by their path in the pytree (``layers.3.wq``);
* ``tokenizer.json`` and ``tokenizer_config.json`` (chat template, special tokens).

Written atomically: a reader sees the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from afmkit.config import ModelConfig
from afmkit.data.tokenizer import Tokenizer
from afmkit.errors import CorruptFileError, UserError
from afmkit.files import atomic_directory
from afmkit.model.transformer import Params, abstract_params

FORMAT = "afmkit-checkpoint"
VERSION = 1
MARKER = "afmkit.json"


def _flatten(params: Params) -> dict[str, Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        flat[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return flat


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def save_checkpoint(
    directory: str | os.PathLike, config: ModelConfig, params: Params, tokenizer: Tokenizer | None
) -> Path:
    from safetensors.flax import save_file

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        tensors = {name: jnp.asarray(leaf) for name, leaf in _flatten(params).items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict()}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
    return directory


def read_config(directory: str | os.PathLike) -> ModelConfig:
    directory = Path(directory)
    try:
        meta = json.loads((directory / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"cannot read {directory / MARKER}: {exc}; the checkpoint is damaged") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(
            f"{directory} is not an afmkit checkpoint of version {VERSION} (found {meta.get('format')} v{meta.get('version')})"
        )
    return ModelConfig.from_dict(meta["config"])


def load_checkpoint(
    directory: str | os.PathLike, *, dtype: Any = jnp.float32
) -> tuple[ModelConfig, Params, Tokenizer | None]:
    from safetensors import safe_open

    directory = Path(directory)
    config = read_config(directory)
    path = directory / "model.safetensors"
    try:
        handle = safe_open(str(path), framework="flax")
        names = set(handle.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptFileError(f"cannot read {path}: {exc}; the checkpoint is damaged, save it again") from None

    def load_leaf(path_keys: Any, spec: jax.ShapeDtypeStruct) -> jax.Array:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path_keys)
        if name not in names:
            raise CorruptFileError(f"{path}: weight {name} is missing; the checkpoint is damaged")
        try:
            value = handle.get_tensor(name)
        except Exception as exc:
            raise CorruptFileError(f"{path}: cannot read weight {name}: {exc}") from None
        if value.shape != spec.shape:
            raise CorruptFileError(f"{path}: weight {name} has shape {value.shape}, config needs {spec.shape}")
        return jnp.asarray(value, dtype=dtype)

    params = jax.tree_util.tree_map_with_path(load_leaf, abstract_params(config))
    tokenizer = Tokenizer.from_directory(directory) if (directory / "tokenizer.json").is_file() else None
    return config, params, tokenizer
