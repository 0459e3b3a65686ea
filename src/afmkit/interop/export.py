"""``afmkit export``: any model afmkit loads, written for the tools people already use.

* ``--format safetensors``: a Hugging Face directory (``config.json``, ``model.safetensors``,
  tokenizer files, ``generation_config.json``) for ``transformers.AutoModelForCausalLM``;
  tensors ``f32`` (default) or ``f16``.
* ``--format gguf``: one llama-architecture GGUF file for llama.cpp (and Ollama, LM Studio...);
  matrices ``f32``, ``f16`` or ``q8_0``.

The weights are read at float32 whatever the source: for SmolLM2's 4-bit GGUF these are exactly
the file's dequantized values. afmkit's packed formats (``--dtype int4``/``int8`` at load time)
are not export formats: a model loaded packed is exported dequantized (its packed values,
exactly), and ``--dtype`` here only chooses how the exported file stores them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from afmkit.errors import UserError
from afmkit.model.packed import dequantize_params
from afmkit.model.transformer import Params

FORMATS = ("safetensors", "gguf")
DTYPES = {"safetensors": ("f32", "f16"), "gguf": ("f32", "f16", "q8_0")}
_NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16}


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """``afmkit export``'s defaults, the one source its flags and ``export_model`` read."""

    dtype: str = "f32"  # exact for every source: afmkit computes in fp32 and dequantizes to it


def float_params(params: Params) -> Params:
    """The weights as float32 numpy arrays; packed weights dequantized (their exact values)."""
    return jax.tree.map(lambda w: np.asarray(w, dtype=np.float32), dequantize_params(params))


def check_export(config: Any, fmt: str, dtype: str) -> None:
    """Everything that can refuse an export, from the config alone (before any weight is read)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES[fmt]:
        hint = " (q8_0 is a GGUF type)" if dtype == "q8_0" else ""
        choices = ", ".join(DTYPES[fmt][:-1]) + f" or {DTYPES[fmt][-1]}"
        raise UserError(f"--format {fmt} stores {choices}, not {dtype!r}{hint}")
    if fmt == "safetensors":
        from afmkit.interop.huggingface import config_to_hf

        config_to_hf(config)
    else:
        from afmkit.interop.gguf import check_gguf_exportable

        check_gguf_exportable(config)


def export_model(model: Any, out: str | Path, *, fmt: str, dtype: str = ExportSettings.dtype) -> Path:
    """Write ``model`` (an ``afmkit.LanguageModel``) to ``out`` as ``fmt`` with ``dtype`` tensors."""
    check_export(model.config, fmt, dtype)
    params = float_params(model.params)
    if fmt == "safetensors":
        from afmkit.interop.huggingface import save_hf_directory

        save_hf_directory(out, model.config, params, model.tokenizer, dtype=_NUMPY_DTYPES[dtype])
        return Path(out)
    from afmkit.interop.gguf import save_gguf

    return save_gguf(out, model.config, params, model.tokenizer, dtype=dtype)


# -- command line ----------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction) -> None:
    from afmkit.cli_args import model_argument

    parser = commands.add_parser(
        "export", help="write a model as a Hugging Face directory (safetensors) or a GGUF file (llama.cpp)"
    )
    model_argument(parser, dtype=False)
    parser.add_argument(
        "--format", required=True, choices=FORMATS, help="safetensors (transformers) or gguf (llama.cpp)"
    )
    parser.add_argument(
        "--out", required=True, help="where to write: a new directory (safetensors) or a new .gguf file (gguf)"
    )
    parser.add_argument(
        "--dtype",
        default=ExportSettings.dtype,
        choices=DTYPES["gguf"],
        help=f"how the file stores the weights: f32 (exact), f16, or q8_0 (GGUF only; 8-bit blocks of 32); "
        f"default {ExportSettings.dtype}",
    )
    parser.set_defaults(run=cmd_export)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def cmd_export(args: argparse.Namespace) -> int:
    from afmkit.cli_args import load_model
    from afmkit.lm import load_config

    out = Path(args.out).expanduser()
    if out.exists():
        raise UserError(f"--out {out} already exists; choose a new path or delete it first")
    if args.format == "gguf" and out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF export is one file; give it the .gguf suffix")
    check_export(load_config(args.model), args.format, args.dtype)  # refuse before the slow load
    model = load_model(args.model, "float32", quiet=False)
    path = export_model(model, out, fmt=args.format, dtype=args.dtype)
    print(f"afmkit: wrote {path} ({args.format}, {args.dtype}, {_size(path) / 1e6:.1f} MB)", file=sys.stderr)
    return 0
