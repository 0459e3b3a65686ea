"""Adapters on disk in the Hugging Face PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's for Llama-family models, e.g.
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``), so an afmkit adapter loads with ``peft`` onto the
transformers model of the same weights, and a PEFT-made adapter loads into afmkit.

Layouts: afmkit's ``wq``/``wk`` are Hugging Face's ``q_proj``/``k_proj`` transposed and reshaped;
the GGUF importer already undoes llama.cpp's interleaved-RoPE row permutation, so their rows are
in Hugging Face's (half-split RoPE) order and LoRA factors need no permutation, only the same
transpose and reshape as the base weights.

Beside them afmkit writes ``afmkit_adapter.json``: a fingerprint of the base model (shapes plus a
sample of weights, see ``base_fingerprint``), so loading onto a different base is refused. It is
a file of its own because PEFT warns about any key of ``adapter_config.json`` it does not know;
adapters saved before kept it under an ``afmkit`` key there, which is still read. Adapters made by
PEFT itself have none: they are checked against the base's shapes only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from afmkit.adapters.lora import INPUT_AXES, TARGETS, LoraAdapter, LoraConfig, check_adapter, lora_shape_table
from afmkit.config import ModelConfig
from afmkit.errors import CorruptFileError, UserError
from afmkit.files import atomic_directory
from afmkit.model.packed import TILE, PackedWeight, _unpack_tiles
from afmkit.model.palettized import PalettizedWeight
from afmkit.model.palettized import values_at as palettized_values
from afmkit.model.transformer import Params

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
AFMKIT_FILE = "afmkit_adapter.json"  # afmkit's own metadata; PEFT never reads it
# afmkit weight name -> PEFT module path inside a decoder layer.
PEFT_MODULES = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}
_MODULE_TO_WEIGHT = {path.split(".")[-1]: weight for weight, path in PEFT_MODULES.items()}
_WEIGHT_TO_TARGET = {weight: target for target, weight in TARGETS.items()}
_PREFIX = "base_model.model.model.layers."


# -- base-model fingerprint -------------------------------------------------------------------
def base_fingerprint(config: ModelConfig, params: Params) -> str:
    """A short hash of the base model's shapes and a sample of its weights.

    Samples are rounded to bf16 first, so the fp32 and bf16 loads of the same weights agree. A
    packed (int4/int8) weight contributes its logical shape and the dequantized values at the
    same positions, so a lossless pack (SmolLM2's own GGUF bits) has the fingerprint of the fp32
    load: an adapter trained on either serves on the other.
    """
    digest = hashlib.sha256()
    digest.update(
        json.dumps([config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.n_kv_heads]).encode()
    )
    samples = [params["embed"], params["final_norm"]]
    for layer in (params["layers"][0], params["layers"][-1]):
        samples += [layer[w] for w in INPUT_AXES]
    for w in samples:
        size = math.prod(w.shape)
        positions = np.arange(0, size, max(1, size // 64))[:64]
        if isinstance(w, PackedWeight):
            picks = _packed_values(w, positions)
        elif isinstance(w, PalettizedWeight):
            picks = palettized_values(w, positions)
        else:
            picks = np.asarray(w).reshape(-1)[positions]
        digest.update(str(tuple(w.shape)).encode())
        digest.update(np.asarray(jnp.asarray(picks, jnp.bfloat16).astype(jnp.float32)).tobytes())
    return digest.hexdigest()[:24]


def _packed_values(w: PackedWeight, positions: np.ndarray) -> np.ndarray:
    """The dequantized values of ``w`` at flat positions of its logical shape (fp32), without
    dequantizing the whole weight: only the output rows that hold them."""
    index = np.unravel_index(positions, w.shape)
    k = np.ravel_multi_index([index[a] for a in w.in_axes], [w.shape[a] for a in w.in_axes])
    n = np.ravel_multi_index([index[a] for a in w.out_axes], [w.shape[a] for a in w.out_axes])
    tiles = n // TILE  # numpy, not ``w.rows``: no compilation per weight shape at server start
    rows = _unpack_tiles(np.asarray(w.packed)[tiles], np.asarray(w.scales)[tiles], w.bits, np)  # [len, K, TILE]
    return rows[np.arange(len(positions)), k, n % TILE]


# -- a small safetensors reader/writer (fp16, bf16, fp32), so bf16 needs no torch --------------
_DTYPES = {"F16": jnp.float16, "BF16": jnp.bfloat16, "F32": jnp.float32}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        data = array.tobytes()
        header[name] = {
            "dtype": _DTYPE_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        raw = path.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        body = memoryview(raw)[8 + size :]
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise CorruptFileError(
                    f"{path}: tensor {name} has dtype {info['dtype']}; adapters use F16, BF16 or F32"
                )
            start, end = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]])
            if end > len(body) or (end - start) != dtype.itemsize * math.prod(info["shape"]):
                raise ValueError(f"tensor {name} lies outside the file or has the wrong size")
            tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
        return tensors
    except CorruptFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as exc:
        raise CorruptFileError(
            f"cannot read {path}: {exc}; the adapter file is damaged; save or download it again"
        ) from None


# -- save / load ------------------------------------------------------------------------------
def save_adapter(
    directory: str | os.PathLike,
    adapter: LoraAdapter,
    *,
    config: ModelConfig,
    params: Params,
    base_name: str = "",
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter`` as a PEFT directory, atomically (an existing one is replaced whole).
    ``extra_files``: more text files for the same directory (e.g. training results)."""
    check_adapter(config, adapter)
    rank = adapter.config.rank
    tensors: dict[str, np.ndarray] = {}
    modules: set[str] = set()
    for i, layer in enumerate(adapter.weights):
        for weight, ab in layer.items():
            key = f"{_PREFIX}{i}.{PEFT_MODULES[weight]}"
            modules.add(PEFT_MODULES[weight].split(".")[-1])
            tensors[f"{key}.lora_A.weight"] = np.asarray(ab["a"]).reshape(-1, rank).T
            tensors[f"{key}.lora_B.weight"] = np.asarray(ab["b"]).reshape(rank, -1).T
    layers = sorted({i for i, layer in enumerate(adapter.weights) if layer})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": adapter.config.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "target_modules": sorted(modules),
        "layers_to_transform": None if len(layers) == config.n_layers else layers,
        "base_model_name_or_path": base_name or config.name,
    }
    ours = {
        "base_fingerprint": base_fingerprint(config, params),
        "base_config": config.name,
        "name": adapter.name,
        "dtype": adapter.config.dtype,
    }
    with atomic_directory(directory) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
        (tmp / AFMKIT_FILE).write_text(json.dumps(ours, indent=2))
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
    return Path(directory)


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"{directory} has no {CONFIG_FILE}; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}; the adapter config is damaged") from None


def read_afmkit_metadata(directory: str | os.PathLike, peft_config: dict[str, Any]) -> dict[str, Any]:
    """afmkit's metadata of an adapter: ``afmkit_adapter.json``, else the ``afmkit`` key that
    adapters saved before it kept in ``adapter_config.json``; ``{}`` for PEFT-made adapters."""
    path = Path(directory) / AFMKIT_FILE
    if not path.is_file():
        return peft_config.get("afmkit") or {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}; the adapter's afmkit metadata is damaged") from None


def load_adapter(
    directory: str | os.PathLike,
    *,
    config: ModelConfig,
    params: Params | None = None,
    fingerprint: str | None = None,
    name: str | None = None,
) -> LoraAdapter:
    """Read a PEFT adapter directory (made by afmkit or by PEFT) for this base model.

    With ``params`` (or its precomputed ``fingerprint``), an afmkit fingerprint must match the
    base (else a ``UserError``); shapes are always checked. Weights come back as host (numpy)
    arrays in their stored precision.
    """
    directory = Path(directory)
    name = name or directory.name
    meta = read_adapter_config(directory)
    if meta.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter {name!r} is a {meta.get('peft_type')} adapter; afmkit loads LoRA adapters")
    for flag in ("use_dora",):
        if meta.get(flag):
            raise UserError(f"adapter {name!r} uses {flag}; afmkit supports plain LoRA")
    if meta.get("bias", "none") != "none":
        raise UserError(f"adapter {name!r} trains biases (bias={meta['bias']!r}); afmkit's model has no biases")
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise UserError(f"adapter {name!r} has per-module ranks or alphas; afmkit needs one rank and alpha")
    ours = read_afmkit_metadata(directory, meta)
    if ours.get("base_fingerprint") and (params is not None or fingerprint):
        expected = fingerprint or base_fingerprint(config, params)
        if ours["base_fingerprint"] != expected:
            raise UserError(
                f"adapter {name!r} was trained for another base model (fingerprint {ours['base_fingerprint']}, "
                f"base {ours.get('base_config', '?')!r}); this base has fingerprint {expected}. "
                "Load it onto the model it was made for, or retrain it for this one"
            )
    try:
        rank, alpha = int(meta["r"]), float(meta.get("lora_alpha", meta["r"]))
    except (KeyError, TypeError, ValueError):
        raise CorruptFileError(f"{directory / CONFIG_FILE} has no valid 'r' (rank)") from None
    if meta.get("use_rslora"):
        alpha = alpha * float(np.sqrt(rank))  # rsLoRA scales by alpha/sqrt(r); ours is alpha/r
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"adapter {name!r} has no {WEIGHTS_FILE}")
    tensors = read_safetensors(weights_path)
    dtype = ours.get("dtype") or _storage_name(tensors)
    weights: list[dict[str, dict[str, Any]]] = [{} for _ in range(config.n_layers)]
    shapes = lora_shape_table(config, rank)
    found_layers: set[int] = set()
    targets: set[str] = set()
    for key, value in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            raise UserError(f"adapter {name!r}: unexpected tensor {key!r}; afmkit reads Llama-style LoRA tensors only")
        layer, module, part = parsed
        if layer >= config.n_layers:
            raise UserError(
                f"adapter {name!r} has layer {layer} but the base model has {config.n_layers} layers; "
                "it was made for another base model"
            )
        weight = _MODULE_TO_WEIGHT[module]
        a_shape, b_shape = shapes[weight]
        want = (rank, math.prod(a_shape[:-1])) if part == "a" else (math.prod(b_shape[1:]), rank)
        rank_axis = 0 if part == "a" else 1
        if value.ndim == 2 and value.shape[1 - rank_axis] == want[1 - rank_axis] and value.shape[rank_axis] != rank:
            raise CorruptFileError(
                f"adapter {name!r}: {CONFIG_FILE} says r={rank} but {key} has rank {value.shape[rank_axis]}; "
                f"set 'r' in {CONFIG_FILE} to the tensors' rank"
            )
        if tuple(value.shape) != want:
            raise UserError(
                f"adapter {name!r}: {key} has shape {tuple(value.shape)} but this base model needs {want}; "
                "it was made for another base model"
            )
        if not np.isfinite(value).all():  # one NaN would turn every output of its rows into garbage
            raise CorruptFileError(
                f"adapter {name!r}: {key} holds NaN or infinite values; the adapter is damaged "
                "(a diverged training run?): retrain it or restore a good copy"
            )
        array = value.T.reshape(a_shape) if part == "a" else value.T.reshape(b_shape)
        weights[layer].setdefault(weight, {})[part] = array  # a view of the file's bytes: no copy
        found_layers.add(layer)
        targets.add(_WEIGHT_TO_TARGET[weight])
    for i, layer in enumerate(weights):
        for weight, ab in layer.items():
            if set(ab) != {"a", "b"}:
                raise CorruptFileError(f"adapter {name!r}: layer {i} {weight} lacks lora_A or lora_B")
    if not targets:
        raise CorruptFileError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA tensors")
    lora = LoraConfig(
        rank=rank,
        alpha=alpha,
        targets=tuple(targets),
        layers=None if len(found_layers) == config.n_layers else tuple(found_layers),
        dtype=dtype,
    )
    adapter = LoraAdapter(config=lora, weights=weights, name=name)
    check_adapter(config, adapter)
    return adapter


def _storage_name(tensors: dict[str, np.ndarray]) -> str:
    dtypes = {np.dtype(t.dtype) for t in tensors.values()}
    if dtypes == {np.dtype(jnp.bfloat16)}:
        return "bfloat16"
    return "float32" if np.dtype(np.float32) in dtypes else "float16"


def _parse_key(key: str) -> tuple[int, str, str] | None:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` -> (3, "q_proj", "a")."""
    if not key.startswith(_PREFIX):
        return None
    parts = key[len(_PREFIX) :].split(".")
    # PEFT may keep the adapter's name (".default") in the key; accept both forms.
    if len(parts) == 6 and parts[4] == "default":
        parts = [*parts[:4], parts[5]]
    if len(parts) != 5 or not parts[0].isdigit() or parts[2] not in _MODULE_TO_WEIGHT or parts[4] != "weight":
        return None
    if parts[3] not in ("lora_A", "lora_B"):
        return None
    return int(parts[0]), parts[2], "a" if parts[3] == "lora_A" else "b"
