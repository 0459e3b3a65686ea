"""Issue 13's comparison table: afmkit's compression against llama.cpp's quantization types, all
made from the same float weights and scored by the same perplexity code.

Rows: float (SmolLM2's GGUF dequantized to fp32: the weights every other row starts from); int4
(the GGUF as is, Q4_1, run by the default int4 engine); palettized 4-bit everywhere; the mixed
3.5-bit allocation (no recovery); and llama.cpp types: the float weights exported as an f32 GGUF
(``afmkit export``), quantized by ``llama_cpp.llama_model_quantize`` (no importance matrix), then
loaded by afmkit (``afmkit.load(file, dtype="float32")``: the gguf package dequantizes every
type exactly) and scored by ``eval.perplexity``.

Bits per weight are over the layer matrices only (the 210 ``blk.*`` / ``layers.*`` matrices), from
the stored bytes: a llama.cpp file's tensor sizes (k-quants need rows of 256 values; SmolLM2's
576-wide rows are not, so llama.cpp stores those matrices in a fallback type, counted here as
stored), afmkit's ``palettize.bits_per_weight`` for palettized models.

Perplexity: ``eval perplexity``'s windows (1,024 tokens, stride 512) on the first ``--eval-chars``
characters of tiny shakespeare; the calibration (Fisher, sensitivities) reads 8,192 tokens from
character 600,000 on, the compressor's documented convention, so the two never overlap.

    nice -n 10 python benchmarks/compression_table.py --work /work/runs/helper-compare/table
    python benchmarks/compression_table.py --only Q2_K IQ3_S   # re-run some rows, keep the rest

Each finished row is written to ``--out`` at once, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "tinyshakespeare_input.txt"
LLAMA_TYPES = ("Q4_K_M", "Q3_K_M", "IQ3_S", "IQ3_XXS", "Q2_K")
AFMKIT_ROWS = ("float", "int4", "palettized-4", "mixed-3.5")
MODEL = "smollm2-135m-instruct"


def matrix_bits_per_weight(path: Path) -> tuple[float, dict[str, int]]:
    """Stored bits per weight over a GGUF's layer matrices, and how many matrices use each type."""
    from gguf import GGUFReader

    bits = weights = 0
    types: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        if re.match(r"blk\.\d+\..*\.weight$", tensor.name) and len(tensor.shape) == 2:
            bits += 8 * int(tensor.n_bytes)
            weights += int(tensor.n_elements)
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return bits / weights, types


def llama_quantize(source: Path, target: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed ({status})")


def score(model, text: str) -> dict:
    from afmkit.eval.perplexity import perplexity_of_text

    begin = time.perf_counter()
    result = perplexity_of_text(model, text, quiet=False)  # eval perplexity's defaults: 1024 / 512
    return {**result.to_dict(), "eval_seconds": time.perf_counter() - begin}


def palettized(float_model, bits_of, calibration_file: str, calibration_start: int):
    """``float_model`` palettized as the compressor does (cached Fisher analysis, Fisher-weighted
    k-means, 8-bit embedding); ``bits_of(analysis)`` gives each matrix's bits."""
    import afmkit
    from afmkit.compress import sensitivity
    from afmkit.compress.palettize import bits_per_weight, palettize_params
    from afmkit.compress.settings import CompressSettings

    settings = CompressSettings(calibration=calibration_file, calibration_start=calibration_start)
    calibration = sensitivity.read_calibration(
        calibration_file,
        float_model.tokenizer,
        start=settings.calibration_start,
        tokens=settings.calibration_tokens,
        seq_len=settings.seq_len,
    )
    analysis = sensitivity.analyze(
        float_model.config, float_model.params, calibration, model_name=MODEL, settings=settings
    )
    bits = bits_of(analysis, settings)
    params = palettize_params(
        float_model.params,
        bits,
        embed_bits=settings.embed_bits,
        group_rows=settings.group_rows,
        per_row_scale=settings.per_row_scale,
        importance=analysis.load_fisher(),
    )
    return afmkit.LanguageModel(float_model.config, params, float_model.tokenizer), bits_per_weight(params)


def all_bits(b: int):
    return lambda analysis, settings: {name: b for name in analysis.shapes}


def allocated(budget: float):
    def bits(analysis, settings):
        from afmkit.compress.allocate import allocate_bits

        return allocate_bits(
            analysis.shapes,
            analysis.sensitivity,
            budget,
            group_rows=settings.group_rows,
            per_row_scale=settings.per_row_scale,
        ).bits

    return bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for the GGUF files (about 1 GB)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compression_table.json"))
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--eval-chars", type=int, default=50_000)
    parser.add_argument("--calibration-start", type=int, default=600_000)
    parser.add_argument("--only", nargs="*", help="rows to (re)run; the others are kept from --out")
    args = parser.parse_args()

    import afmkit
    from afmkit.interop.export import export_model
    from afmkit.interop.gguf_types import tensor_types
    from afmkit.weights import smollm2_gguf_path

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    text = Path(args.text).read_text(encoding="utf-8")[: args.eval_chars]
    table["setup"] = {
        "model": MODEL,
        "eval_text": f"{args.text} characters 0-{args.eval_chars}",
        "calibration": f"{args.text} 8192 tokens from character {args.calibration_start}",
        "seq_len": 1024,
        "stride": 512,
        "cpu": os.cpu_count(),
        "llama_cpp_imatrix": None,
    }
    wanted = args.only or [*AFMKIT_ROWS, *LLAMA_TYPES]

    def record(name: str, row: dict) -> None:
        row["load_average"] = os.getloadavg()
        table["rows"][name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=1) + "\n")
        print(f"{name}: {row['bits_per_weight']:.3f} bits/weight, perplexity {row['perplexity']:.3f}", flush=True)

    # llama.cpp rows first: the afmkit rows are also measured by benchmarks/compress_sensitivity.py
    float_model = afmkit.load(MODEL, dtype="float32")
    f32 = work / "smollm2-f32.gguf"
    if any(t in wanted for t in LLAMA_TYPES) and not f32.is_file():
        export_model(float_model, f32, fmt="gguf", dtype="f32")
    for kind in LLAMA_TYPES:
        if kind not in wanted:
            continue
        path = work / f"smollm2-{kind}.gguf"
        seconds = None  # a file kept from an earlier run was not timed
        if not path.is_file():
            begin = time.perf_counter()
            llama_quantize(f32, path, kind)
            seconds = time.perf_counter() - begin
        bpw, types = matrix_bits_per_weight(path)
        model = afmkit.load(str(path), dtype="float32")
        row = {"bits_per_weight": bpw, "types": types, "quantize_seconds": seconds, **score(model, text)}
        row["embedding_type"] = tensor_types(path).get("token_embd.weight")
        record(kind, row)
        del model

    if "float" in wanted:
        record("float", {"bits_per_weight": 32.0, **score(float_model, text)})
    if "int4" in wanted:
        int4 = afmkit.load(MODEL)  # the default on CPUs: the GGUF's Q4_1 blocks, native kernels
        bpw, types = matrix_bits_per_weight(smollm2_gguf_path())
        record("int4", {"bits_per_weight": bpw, "types": types, "dtype": "int4", **score(int4, text)})
        del int4
    for name, bits_of in (("palettized-4", all_bits(4)), ("mixed-3.5", allocated(3.5))):
        if name in wanted:
            begin = time.perf_counter()
            model, bpw = palettized(float_model, bits_of, args.text, args.calibration_start)
            seconds = time.perf_counter() - begin
            record(name, {"bits_per_weight": bpw, "compress_seconds": seconds, **score(model, text)})
            del model


if __name__ == "__main__":
    main()
