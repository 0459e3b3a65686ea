"""afmkit's own checkpoint format: a directory holding

* ``afmkit.json``: format marker, version and the model config;
* ``model.safetensors``: weights, named by their path in the pytree (``layers.3.wq``);
  a compressed weight (``PalettizedWeight``, ``PackedWeight``) is stored as its parts
  (``layers.3.wq.indices``, ``.tables``, ``.scales``; ``embed.packed``, ``embed.scales``), and
  ``afmkit.json`` lists it under ``quantized`` with its kind, bits, shape and input axes;
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
from afmkit.model.packed import BLOCK, PackedWeight
from afmkit.model.palettized import CODES_PER_WORD, TILE, PalettizedWeight, check_layout
from afmkit.model.transformer import Params, abstract_params

FORMAT = "afmkit-checkpoint"
VERSION = 1
MARKER = "afmkit.json"


def leaf_name(path: Any) -> str:
    """``layers.3.wq`` for the pytree path params["layers"][3]["wq"]."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_compressed(leaf: Any) -> bool:
    return isinstance(leaf, (PalettizedWeight, PackedWeight))


def _flatten(params: Params) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_compressed)
    return {leaf_name(path): leaf for path, leaf in leaves}


def _compressed_parts(name: str, leaf: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors a compressed weight is saved as, and its ``quantized`` entry in afmkit.json."""
    meta = {"bits": leaf.bits, "shape": list(leaf.shape), "in_axes": list(leaf.in_axes)}
    if isinstance(leaf, PackedWeight):
        return {f"{name}.packed": leaf.packed, f"{name}.scales": leaf.scales}, {"kind": "packed", **meta}
    tensors = {f"{name}.indices": leaf.indices, f"{name}.tables": leaf.tables}
    if leaf.scales is not None:
        tensors[f"{name}.scales"] = leaf.scales
    return tensors, {"kind": "palettized", **meta}


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def save_checkpoint(
    directory: str | os.PathLike,
    config: ModelConfig,
    params: Params,
    tokenizer: Tokenizer | None,
    *,
    default_adapter: Any = None,
) -> Path:
    """``default_adapter`` (a ``LoraAdapter``) goes in ``directory/recovery``, the adapter
    ``afmkit.load(directory)`` applies to requests that name none, inside the same atomic write."""
    from safetensors.flax import save_file

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        tensors, quantized = {}, {}
        for name, leaf in _flatten(params).items():
            if _is_compressed(leaf):
                parts, quantized[name] = _compressed_parts(name, leaf)
                tensors.update({part: jnp.asarray(value) for part, value in parts.items()})
            else:
                tensors[name] = jnp.asarray(leaf)
        save_file(tensors, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict()}
        if quantized:
            meta["quantized"] = quantized
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
        if default_adapter is not None:
            from afmkit.adapters.peft_io import save_adapter
            from afmkit.compress.recover import RECOVERY_DIR

            save_adapter(tmp / RECOVERY_DIR, default_adapter, config=config, params=params)
    return directory


def read_config(directory: str | os.PathLike) -> ModelConfig:
    return ModelConfig.from_dict(_read_meta(Path(directory))["config"])


def _read_meta(directory: Path) -> dict[str, Any]:
    try:
        meta = json.loads((directory / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"cannot read {directory / MARKER}: {exc}; the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = meta if not isinstance(meta, dict) else f"{meta.get('format')} v{meta.get('version')}"
        raise UserError(f"{directory} is not an afmkit checkpoint of version {VERSION} (found {found})")
    return meta


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
    meta = _read_meta(directory)
    config = ModelConfig.from_dict(meta["config"])
    quantized = meta.get("quantized", {})
    reader = SafetensorsReader(directory / "model.safetensors")

    def load_leaf(path_keys: Any, spec: jax.ShapeDtypeStruct) -> Any:
        name = leaf_name(path_keys)
        if name in quantized:
            return _load_compressed(reader, name, quantized[name], spec.shape)
        value = reader.read(name)
        if value.shape != spec.shape:
            raise CorruptFileError(f"{reader.path}: weight {name} has shape {value.shape}, config needs {spec.shape}")
        return convert(name, value) if convert else jnp.asarray(value, dtype=dtype)

    params = jax.tree_util.tree_map_with_path(load_leaf, abstract_params(config))
    tokenizer = Tokenizer.from_directory(directory) if (directory / "tokenizer.json").is_file() else None
    return config, params, tokenizer


def _load_compressed(reader: SafetensorsReader, name: str, entry: Any, shape: tuple[int, ...]) -> Any:
    """A compressed weight from its parts, each checked against the layout its entry describes
    (a damaged file is a one-line ``CorruptFileError``, never a wrong model)."""

    def damaged(problem: str) -> CorruptFileError:
        return CorruptFileError(f"{reader.path}: compressed weight {name} {problem}; the checkpoint is damaged")

    try:
        kind, bits = entry["kind"], int(entry["bits"])
        in_axes = tuple(int(a) for a in entry["in_axes"])
        if tuple(entry["shape"]) != tuple(shape):
            raise damaged(f"has shape {tuple(entry['shape'])}, the config needs {tuple(shape)}")
        if not in_axes or any(a < 0 or a >= len(shape) for a in in_axes):
            raise damaged(f"has input axes {in_axes} outside its shape {tuple(shape)}")
    except (KeyError, TypeError, ValueError):
        raise damaged(f"has an unreadable entry {entry!r} in {MARKER}") from None
    k = int(np.prod([shape[a] for a in in_axes]))
    n = int(np.prod(shape)) // k

    def part(suffix: str, dtype: Any, expected: tuple[int, ...] | None) -> np.ndarray:
        value = reader.read(f"{name}.{suffix}")
        if value.dtype != dtype or (expected is not None and value.shape != expected):
            raise damaged(
                f"has {suffix} {value.dtype}{list(value.shape)}, expected {np.dtype(dtype)}{list(expected or [])}"
            )
        return value

    if kind == "packed":
        if bits not in (4, 8) or k % BLOCK or n % TILE:
            raise damaged(f"cannot be a {bits}-bit packed weight of shape {tuple(shape)}")
        per_pair = TILE if bits == 4 else 2 * TILE
        packed = part("packed", np.uint8, (n // TILE, k // BLOCK, BLOCK // 2, per_pair))
        scales = part("scales", np.float16, (n // TILE, k // BLOCK, 2, TILE))
        return PackedWeight(jnp.asarray(packed), jnp.asarray(scales), bits, tuple(shape), in_axes)
    if kind != "palettized":
        raise damaged(f"has unknown kind {kind!r} (known: palettized, packed)")
    indices = part("indices", np.uint8, (n // TILE, k // CODES_PER_WORD, bits, TILE))
    tables = part("tables", np.float16, None)
    scales = part("scales", np.float16, (n,)) if f"{name}.scales" in reader.entries else None
    try:
        if tables.ndim != 2 or tables.shape[1] != 2**bits or tables.shape[0] == 0 or n % tables.shape[0]:
            raise UserError(f"has tables of shape {list(tables.shape)} for {bits}-bit indices and {n} outputs")
        check_layout(tuple(shape), in_axes, bits, n // tables.shape[0])
    except UserError as exc:
        raise damaged(f"does not fit its layout ({exc})") from None
    return PalettizedWeight(
        jnp.asarray(indices),
        jnp.asarray(tables),
        None if scales is None else jnp.asarray(scales),
        bits,
        tuple(shape),
        in_axes,
    )
