"""Llama-architecture GGUF files (llama.cpp's format): config, weights, tokenizer, both ways.

Import: quantized tensors (Q4_1, Q8_0, ...) are dequantized to float with the ``gguf`` package.
llama.cpp stores Q and K projections with their rows interleaved for its RoPE layout; they are
put back in the Hugging Face (half-split) layout that afmkit's RoPE uses.

Export (``save_gguf``): the inverse, with the ``gguf`` package's writer and quantizer: llama
metadata, the byte-level BPE tokenizer, Q/K rows interleaved again, matrices in f32, f16 or
Q8_0 (norm vectors always f32, as llama.cpp requires).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from afmkit.config import ModelConfig
from afmkit.data.tokenizer import Tokenizer
from afmkit.errors import CorruptFileError, UserError
from afmkit.interop.huggingface import HF_CARRIED_FIELDS, features_without_equivalent, params_from_hf_tensors
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


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's per-head interleaving of RoPE pairs: the inverse of ``_unpermute_rope_rows``."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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


# -- export ----------------------------------------------------------------------------------

GGUF_DTYPES = ("f32", "f16", "q8_0")
# What the llama architecture carries: the Hugging Face Llama fields, without q/k-norm.
_LLAMA_CARRIED_FIELDS = HF_CARRIED_FIELDS - {"qk_norm"}
_GGUF_NAMES = {hf: gguf for gguf, hf in _LAYER_TENSORS.items()}
# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5
# The pre-tokenizer afmkit's GGUF reader builds, by its llama.cpp name (``tokenizer.ggml.pre``).
_SMOLLM_PRE_TOKENIZER = [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False},
]


def check_gguf_exportable(config: ModelConfig) -> None:
    missing = features_without_equivalent(config, _LLAMA_CARRIED_FIELDS)
    if missing:
        raise UserError(
            f"{config.name} uses {', '.join(missing)}, which GGUF's llama architecture lacks; "
            "export it with --format safetensors instead"
        )


def _gguf_tensor_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}.weight"


def _tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """``tokenizer.ggml.*`` values for a byte-level BPE tokenizer with single-digit splitting."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    shape = [{k: step.get(k) for k in ("type", "individual_digits", "add_prefix_space") if k in step} for step in steps]
    if model.get("type") != "BPE" or shape != _SMOLLM_PRE_TOKENIZER:
        kinds = " + ".join(str(step.get("type")) for step in steps)
        raise UserError(
            f"GGUF export writes byte-level BPE tokenizers that split digits one by one (SmolLM2's, llama.cpp's "
            f"'smollm'); this one is {model.get('type')} with pre-tokenizer {kinds}: export with --format safetensors"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise UserError(f"the tokenizer has {len(vocab)} tokens but the model embeds only {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows the tokenizer never produces
    types = [_UNUSED] * vocab_size
    for text, index in vocab.items():
        tokens[index], types[index] = text, _NORMAL
    for index, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[index] = _CONTROL if added.special else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    from afmkit.data.tokenizer import CHATML_TEMPLATE

    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
        "add_bos": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template or CHATML_TEMPLATE,  # the one afmkit applies
    }


def save_gguf(
    path: str | os.PathLike, config: ModelConfig, params: Params, tokenizer: Tokenizer, *, dtype: str = "f32"
) -> Path:
    """Write a llama-architecture GGUF file that llama.cpp (and ``afmkit.load``) reads.

    ``dtype``: ``f32``, ``f16`` or ``q8_0`` for the matrices (blocks of 32 along each row, one
    f16 scale per block; a matrix whose rows are not a multiple of 32 is stored f16 instead, as
    llama.cpp's converter does). Written to a temporary file and renamed, so a failed export
    leaves no partial file.
    """
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    from afmkit.interop.huggingface import params_to_hf_tensors

    if dtype not in GGUF_DTYPES:
        raise UserError(f"GGUF export writes {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    check_gguf_exportable(config)
    vocab = _tokenizer_metadata(tokenizer, config.vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    matrix_type = {
        "f32": GGMLQuantizationType.F32,
        "f16": GGMLQuantizationType.F16,
        "q8_0": GGMLQuantizationType.Q8_0,
    }[dtype]
    writer = GGUFWriter(str(tmp), arch="llama")
    try:
        writer.add_name(config.name)
        writer.add_file_type(
            {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype]
        )
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.d_model)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_base)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        if vocab["bos"] is not None:
            writer.add_bos_token_id(vocab["bos"])
        if vocab["eos"] is not None:
            writer.add_eos_token_id(vocab["eos"])
        writer.add_add_bos_token(vocab["add_bos"])
        writer.add_chat_template(vocab["chat_template"])
        for hf_name, w in params_to_hf_tensors(config, params):
            w = np.asarray(w, np.float32)
            if hf_name.endswith("q_proj.weight"):
                w = _permute_rope_rows(w, config.n_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = _permute_rope_rows(w, config.n_kv_heads)
            kind = matrix_type if w.ndim == 2 else GGMLQuantizationType.F32
            if kind == GGMLQuantizationType.Q8_0 and w.shape[-1] % 32:
                kind = GGMLQuantizationType.F16
            data = quantize(np.ascontiguousarray(w), kind)
            writer.add_tensor(_gguf_tensor_name(hf_name), data, raw_dtype=kind if kind.name.startswith("Q") else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
