"""Import Llama-architecture GGUF files (llama.cpp's format): config, weights, tokenizer.

Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float with the ``gguf`` package.
llama.cpp stores Q and K projections with their rows interleaved for its RoPE layout; they are
put back in the Hugging Face (half-split) layout that afmkit's RoPE uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from afmkit.config import ModelConfig
from afmkit.data.tokenizer import Tokenizer
from afmkit.errors import CorruptFileError, UserError
from afmkit.interop.huggingface import params_from_hf_tensors
from afmkit.model.transformer import Params

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of RoPE pairs in a Q/K weight ``[rows, cols]``."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize_rows(tensor: Any, dequantize: Any, rows_per_chunk: int = 4096) -> np.ndarray:
    """Dequantize a tensor a block of rows at a time, so temporaries stay small."""
    data = tensor.data
    if data.ndim < 2 or data.shape[0] <= rows_per_chunk:
        return np.asarray(dequantize(data, tensor.tensor_type), dtype=np.float32)
    first = np.asarray(dequantize(data[:rows_per_chunk], tensor.tensor_type), dtype=np.float32)
    out = np.empty((data.shape[0], *first.shape[1:]), np.float32)
    out[:rows_per_chunk] = first
    for start in range(rows_per_chunk, data.shape[0], rows_per_chunk):
        out[start : start + rows_per_chunk] = dequantize(data[start : start + rows_per_chunk], tensor.tensor_type)
    return out


def read_fields(reader: Any) -> dict[str, Any]:
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # a field of an unusual type we never read
            continue
    return fields


def read_gguf(path: str | os.PathLike, *, name: str | None = None) -> tuple[Any, dict[str, Any], ModelConfig]:
    """Open a GGUF file: its reader, metadata fields and the model config they describe."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist; check the path")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/etc on damaged files
        raise CorruptFileError(
            f"cannot read GGUF file {path}: {exc}; the file is damaged or not GGUF, re-download it"
        ) from None
    fields = read_fields(reader)
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; afmkit imports 'llama' GGUF files")

    def meta(key: str, default: Any = None) -> Any:
        value = fields.get(f"llama.{key}", default)
        if value is None:
            raise CorruptFileError(f"{path}: GGUF metadata llama.{key} is missing")
        return value

    heads = int(meta("attention.head_count"))
    d_model = int(meta("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = fields.get("llama.vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    config = ModelConfig(
        name=name or path.stem,
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(meta("block_count")),
        n_heads=heads,
        n_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(fields.get("llama.attention.key_length") or d_model // heads),
        d_ff=int(meta("feed_forward_length")),
        rope_base=float(meta("rope.freq_base", 10_000.0)),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names,
        max_seq_len=int(meta("context_length", 4096)),
    )
    return reader, fields, config


def load_gguf(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, name: str | None = None
) -> tuple[ModelConfig, Params, Tokenizer]:
    """Config, dequantized weights and tokenizer from a GGUF file."""
    from gguf.quants import dequantize

    reader, fields, config = read_gguf(path, name=name)
    path = Path(path)
    tensors = {t.name: t for t in reader.tensors}
    by_hf_name = {_hf_name(n): t for n, t in tensors.items()}

    def get(hf_name: str) -> np.ndarray:
        tensor = by_hf_name.get(hf_name)
        if tensor is None:
            raise CorruptFileError(f"{path}: tensor for {hf_name} is missing; the file is incomplete")
        try:
            w = _dequantize_rows(tensor, dequantize)
        except Exception as exc:
            raise CorruptFileError(
                f"{path}: cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {exc}"
            ) from None
        if hf_name.endswith("q_proj.weight"):
            w = _unpermute_rope_rows(w, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = _unpermute_rope_rows(w, config.n_kv_heads)
        return w

    try:
        params = params_from_hf_tensors(config, get, dtype=dtype)
        tokenizer = Tokenizer.from_gguf_fields(fields)
    except (ValueError, IndexError) as exc:  # data section shorter than the header promises
        raise CorruptFileError(f"cannot read GGUF file {path}: {exc}; the file is damaged, re-download it") from None
    return config, params, tokenizer
