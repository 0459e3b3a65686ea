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
import numpy as np

from afmkit.config import ModelConfig
from afmkit.data.tokenizer import Tokenizer
from afmkit.errors import CorruptFileError, UserError
from afmkit.files import atomic_directory
from afmkit.model.transformer import Params, abstract_params

FORMAT = "afmkit-checkpoint"
VERSION = 1
MARKER = "afmkit.json"


def leaf_name(path: Any) -> str:
    """``layers.3.wq`` for the pytree path params["layers"][3]["wq"]."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flatten(params: Params) -> dict[str, Any]:
    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


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


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I32": np.int32, "U8": np.uint8}


class SafetensorsReader:
    """Reads one tensor at a time with plain file reads.

    Unlike a memory map, nothing stays resident after a tensor is converted, so loading peaks
    at the weights plus one tensor rather than twice the weights.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                header_len = int(np.frombuffer(f.read(8), np.uint64)[0])
                if header_len > 100_000_000:
                    raise ValueError("header length is implausible")
                header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, ValueError, IndexError) as exc:
            raise CorruptFileError(f"cannot read {path}: {exc}; the file is damaged, save it again") from None
        header.pop("__metadata__", None)
        self.entries = header
        self.data_start = 8 + header_len
        self.size = path.stat().st_size

    def read(self, name: str) -> np.ndarray:
        entry = self.entries.get(name)
        if entry is None:
            raise CorruptFileError(f"{self.path}: weight {name} is missing; the checkpoint is damaged")
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(
                f"{self.path}: weight {name} has an unreadable entry {entry!r} (supported dtypes: "
                f"{', '.join(_SAFETENSORS_DTYPES)}); the checkpoint is damaged"
            ) from None
        if end - begin != int(np.prod(shape)) * dtype.itemsize or self.data_start + end > self.size:
            raise CorruptFileError(f"{self.path}: weight {name} is truncated; the checkpoint is damaged")
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        return out


def load_checkpoint(
    directory: str | os.PathLike, *, dtype: Any = jnp.float32, convert: Any = None
) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """Config, weights (as ``dtype``) and tokenizer (None if not saved) of a checkpoint.
    ``convert(name, array)``, if given, makes each weight from its numpy value instead (packing
    a weight as it is read keeps one full-precision weight in memory at a time, not all)."""
    directory = Path(directory)
    config = read_config(directory)
    reader = SafetensorsReader(directory / "model.safetensors")

    def load_leaf(path_keys: Any, spec: jax.ShapeDtypeStruct) -> jax.Array:
        name = leaf_name(path_keys)
        value = reader.read(name)
        if value.shape != spec.shape:
            raise CorruptFileError(f"{reader.path}: weight {name} has shape {value.shape}, config needs {spec.shape}")
        return convert(name, value) if convert else jnp.asarray(value, dtype=dtype)

    params = jax.tree_util.tree_map_with_path(load_leaf, abstract_params(config))
    tokenizer = Tokenizer.from_directory(directory) if (directory / "tokenizer.json").is_file() else None
    return config, params, tokenizer
