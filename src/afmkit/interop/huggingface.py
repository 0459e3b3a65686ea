"""Hugging Face Llama-family checkpoints: ``config.json`` + ``*.safetensors`` (+ tokenizer).

Also the name mapping between afmkit's weight pytree and the Hugging Face (PyTorch) layout,
which the GGUF importer reuses.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from afmkit.config import ModelConfig
from afmkit.errors import CorruptFileError, UserError
from afmkit.model.transformer import Params

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen3", "smollm3")

# afmkit per-layer name -> Hugging Face per-layer name.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def config_from_hf(hf: dict[str, Any], *, name: str) -> ModelConfig:
    """An afmkit config from a Hugging Face ``config.json``; refuses what the model cannot run."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{name}: model_type {model_type!r} is not supported; afmkit imports {', '.join(SUPPORTED_MODEL_TYPES)} "
            "checkpoints (decoder-only, no biases, SwiGLU, RoPE)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise UserError(f"{name}: {flag}=true; afmkit's transformer has no biases")
    scaling = hf.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise UserError(f"{name}: rope_scaling {scaling} is not supported; only plain RoPE is")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{name}: hidden_act {hf.get('hidden_act')!r} is not supported; afmkit uses SwiGLU (silu)")
    heads = hf["num_attention_heads"]
    rope_params = hf.get("rope_parameters") or {}
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        d_ff=hf["intermediate_size"],
        rope_base=float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10_000.0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
    )


# ModelConfig fields a Hugging Face Llama/Qwen3 config carries, or that do not change what the
# model computes (training-only and descriptive fields). Any other field away from its default is
# a feature those architectures lack, and the export is refused rather than silently wrong.
HF_CARRIED_FIELDS = frozenset(
    {
        "name",
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "d_ff",
        "rope_base",
        "norm_eps",
        "qk_norm",
        "tie_embeddings",
        "max_seq_len",
        "z_loss",
        "note",
    }
)
_FEATURE_NAMES = {
    "qk_norm": "q/k-norm",
    "qk_norm_position": "q/k-norm after RoPE (AFM's order; Qwen3 normalizes before RoPE)",
}


def features_without_equivalent(config: ModelConfig, carried: frozenset[str]) -> list[str]:
    """Names of the config's features that a target format lacking ``carried`` fields cannot express."""
    features = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in carried or value == field.default:
            continue
        if field.name == "qk_norm_position" and not config.qk_norm:
            continue  # the position of a norm that is not there changes nothing
        features.append(_FEATURE_NAMES.get(field.name, f"{field.name}={value!r}"))
    return features


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for this config (Llama, or Qwen3 when it has q/k-norm)."""
    missing = features_without_equivalent(config, HF_CARRIED_FIELDS)
    if missing:
        raise UserError(
            f"{config.name} uses {', '.join(missing)}; neither Hugging Face architecture afmkit writes "
            "(Llama, Qwen3) has it, so transformers could not run this model"
        )
    model_type = "qwen3" if config.qk_norm else "llama"
    return {
        "architectures": ["Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.d_ff,
        "rope_theta": config.rope_base,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def params_from_hf_tensors(
    config: ModelConfig, get: Callable[[str], np.ndarray], *, dtype: Any = jnp.float32
) -> Params:
    """Build afmkit weights from Hugging Face-named tensors, one tensor at a time (low peak memory)."""
    d, hd = config.d_model, config.head_dim

    def load(name: str, transform: Callable[[np.ndarray], np.ndarray] = lambda w: w) -> Any:
        return jnp.asarray(transform(np.asarray(get(name), dtype=np.float32)), dtype=dtype)

    layers = []
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        layer = {
            "attn_norm": load(prefix + _LAYER_NAMES["attn_norm"]),
            "wq": load(prefix + _LAYER_NAMES["wq"], lambda w: w.T.reshape(d, config.n_heads, hd)),
            "wk": load(prefix + _LAYER_NAMES["wk"], lambda w: w.T.reshape(d, config.n_kv_heads, hd)),
            "wv": load(prefix + _LAYER_NAMES["wv"], lambda w: w.T.reshape(d, config.n_kv_heads, hd)),
            "wo": load(prefix + _LAYER_NAMES["wo"], lambda w: w.T.reshape(config.n_heads, hd, d)),
            "mlp_norm": load(prefix + _LAYER_NAMES["mlp_norm"]),
            "w_gate": load(prefix + _LAYER_NAMES["w_gate"], lambda w: w.T),
            "w_up": load(prefix + _LAYER_NAMES["w_up"], lambda w: w.T),
            "w_down": load(prefix + _LAYER_NAMES["w_down"], lambda w: w.T),
        }
        if config.qk_norm:
            layer["q_norm"] = load(prefix + _LAYER_NAMES["q_norm"])
            layer["k_norm"] = load(prefix + _LAYER_NAMES["k_norm"])
        layers.append(layer)
    params: Params = {
        "embed": load("model.embed_tokens.weight"),
        "layers": layers,
        "final_norm": load("model.norm.weight"),
    }
    if not config.tie_embeddings:
        params["lm_head"] = load("lm_head.weight", lambda w: w.T)
    _check_shapes(config, params)
    return params


def params_to_hf_tensors(config: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, PyTorch-layout array) for every weight."""
    d = config.d_model
    yield "model.embed_tokens.weight", np.asarray(params["embed"])
    yield "model.norm.weight", np.asarray(params["final_norm"])
    if "lm_head" in params:
        yield "lm_head.weight", np.asarray(params["lm_head"]).T
    for i, layer in enumerate(params["layers"]):
        for key, value in layer.items():
            w = np.asarray(value)
            if key in ("wq", "wk", "wv"):
                w = w.reshape(d, -1).T
            elif key == "wo":
                w = w.reshape(-1, d).T
            elif key.startswith("w_"):
                w = w.T
            yield f"model.layers.{i}.{_LAYER_NAMES[key]}", np.ascontiguousarray(w)


def _check_shapes(config: ModelConfig, params: Params) -> None:
    import jax

    from afmkit.model.transformer import abstract_params

    expected = abstract_params(config)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(params)):
        if tuple(want.shape) != tuple(got.shape):
            raise CorruptFileError(
                f"weight {jax.tree_util.keystr(path)} has shape {tuple(got.shape)} but the config needs {tuple(want.shape)}"
            )


def load_hf_directory(directory: str | os.PathLike, *, dtype: Any = jnp.float32) -> tuple[ModelConfig, Params]:
    """Read a Hugging Face checkpoint directory (single or sharded safetensors)."""
    from safetensors import safe_open

    directory = Path(directory)
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"cannot read {directory / 'config.json'}: {exc}") from None
    config = config_from_hf(hf_config, name=directory.name)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors files in {directory}; afmkit reads safetensors checkpoints only")
    where: dict[str, Any] = {}
    try:
        for path in files:
            handle = safe_open(str(path), framework="flax")
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                where[key] = handle
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CorruptFileError(f"cannot read {path}: {exc}; the file is truncated or not safetensors") from None

    def get(name: str) -> np.ndarray:
        if name not in where:
            if name == "lm_head.weight":
                raise CorruptFileError(f"{directory}: no lm_head.weight although tie_word_embeddings is false")
            raise CorruptFileError(f"{directory}: missing tensor {name}")
        return np.asarray(where[name].get_tensor(name).astype(jnp.float32))

    return config, params_from_hf_tensors(config, get, dtype=dtype)


def save_hf_directory(
    directory: str | os.PathLike, config: ModelConfig, params: Params, tokenizer: Any = None, *, dtype: Any = np.float32
) -> None:
    """Write a checkpoint that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, its
    tensors stored as ``dtype`` (float32 or float16)."""
    from safetensors.numpy import save_file

    from afmkit.files import atomic_directory

    dtype = np.dtype(dtype)
    hf_config = config_to_hf(config)  # refuses configs transformers cannot express, before any write
    hf_config["torch_dtype"] = str(dtype)
    generation = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.stop_ids or tokenizer.eos_id}
        hf_config.update({k: v for k, v in ids.items() if v is not None})
        generation = {k: v for k, v in ids.items() if v is not None}
    with atomic_directory(directory) as tmp:
        tensors = {name: w.astype(dtype) for name, w in params_to_hf_tensors(config, params)}
        if config.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
