"""Sensitivity analysis and bit allocation on SmolLM2-135M-Instruct (docs/compression.md).

Calibration: tiny shakespeare from character 600,000 on (the second half); evaluation: its first
50,000 characters (inside the first 100,000 that docs/evaluation.md's perplexity uses), so the
two never overlap. Measures: the analysis time (Fisher + proxy), the 3.5-bit allocation, the
perplexity of float / uniform 4-bit / allocated 3.5-bit palettized models, how well the proxy
rank-correlates with measured KL on a sample of matrices, and the 8-bit extrapolation against
real 8-bit k-means. Writes JSON (to --out, updated after every phase) and prints it.

    python benchmarks/compress_sensitivity.py --out compress_sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import afmkit
from afmkit.compress import allocate, recipe, sensitivity
from afmkit.compress.palettize import bits_per_weight, palettize_params
from afmkit.compress.settings import CompressSettings
from afmkit.eval.perplexity import perplexity_of_text
from afmkit.files import shared_data_dir
from afmkit.lm import LanguageModel

CALIBRATION_START = 600_000
EVAL_CHARS = 50_000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="compress_sensitivity.json")
    parser.add_argument("--study-layers", default="0,10,20,29")
    parser.add_argument("--study-widths", default="2,4")
    parser.add_argument("--measure-tokens", type=int, default=1024)
    parser.add_argument("--skip-perplexity", action="store_true")
    args = parser.parse_args()
    result: dict = {"load_average_start": os.getloadavg()}

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    text_path = shared_data_dir() / "pretrain" / "tinyshakespeare_input.txt"
    begin = time.perf_counter()
    model = afmkit.load("smollm2-135m-instruct", dtype="float32")
    result["load_seconds"] = time.perf_counter() - begin
    settings = CompressSettings(calibration=str(text_path), calibration_start=CALIBRATION_START)
    calibration = sensitivity.read_calibration(
        text_path, model.tokenizer, start=settings.calibration_start, tokens=settings.calibration_tokens
    )
    begin = time.perf_counter()
    fingerprint = sensitivity.model_fingerprint(model.config, model.params)
    result["fingerprint_seconds"] = time.perf_counter() - begin
    begin = time.perf_counter()
    analysis = sensitivity.analyze(
        model.config, model.params, calibration, model_name=model.name, fingerprint=fingerprint, settings=settings
    )
    result["analysis_wall_seconds"] = time.perf_counter() - begin
    result["analysis_phase_seconds"] = analysis.seconds
    result["analysis_from_cache"] = analysis.fisher is None
    result["calibration"] = calibration.info()
    fisher = analysis.load_fisher()
    begin = time.perf_counter()
    again = sensitivity.cached_analysis(fingerprint, calibration.sha256, analysis.settings)
    result["cached_analysis_open_seconds"] = time.perf_counter() - begin
    assert again is not None
    save()

    shapes = analysis.shapes
    alloc = allocate.allocate_bits(shapes, analysis.sensitivity, 3.5, group_rows=16, per_row_scale=True)
    result["allocation_3.5"] = {
        "bits_per_weight": alloc.bits_per_weight,
        "exact": alloc.exact,
        "predicted_sensitivity": alloc.predicted_sensitivity,
        "bits_by_type": recipe.bits_by_type(alloc.bits),
        "two_bit": sorted(n for n, b in alloc.bits.items() if b == 2),
    }
    result["uniform_4_predicted_sensitivity"] = sum(s[4] for s in analysis.sensitivity.values())
    result["uniform_4_bits_per_weight"] = allocate.bits_per_weight(
        shapes, dict.fromkeys(shapes, 4), group_rows=16, per_row_scale=True
    )
    result["mean_proxy_by_type"] = {
        kind: {b: sum(analysis.sensitivity[n][b] for n in shapes if n.endswith("." + kind)) / 30 for b in (2, 3, 4)}
        for kind in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    }
    save()

    if not args.skip_perplexity:
        text = text_path.read_text()[:EVAL_CHARS]
        result["perplexity"] = {"eval_chars": EVAL_CHARS, "seq_len": 1024, "stride": 512}
        for label, bits in (("float", None), ("uniform_4bit", 4), ("allocated_3.5", alloc.bits)):
            begin = time.perf_counter()
            params = model.params if bits is None else palettize_params(model.params, bits, importance=fisher)
            palettize_seconds = time.perf_counter() - begin
            candidate = LanguageModel(model.config, params, model.tokenizer, name=label)
            begin = time.perf_counter()
            ppl = perplexity_of_text(candidate, text)
            result["perplexity"][label] = {
                "perplexity": ppl.perplexity,
                "tokens": ppl.tokens,
                "bits_per_weight": None if bits is None else bits_per_weight(params),
                "palettize_seconds": palettize_seconds,
                "eval_seconds": time.perf_counter() - begin,
            }
            save()

    layers = [int(x) for x in args.study_layers.split(",")]
    names = [f"layers.{i}.{k}" for i in layers for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    begin = time.perf_counter()
    widths = tuple(int(x) for x in args.study_widths.split(","))
    measured = sensitivity.measured_sensitivity(
        model.config, model.params, calibration, fisher, names=names, widths=widths, measure_tokens=args.measure_tokens
    )
    result["study"] = {
        "matrices": names,
        "measure_tokens": args.measure_tokens,
        "seconds": time.perf_counter() - begin,
        "measured_kl": measured,
        "proxy": {n: analysis.sensitivity[n] for n in names},
        **sensitivity.proxy_vs_measured(analysis.sensitivity, measured),
    }
    save()
    exact8 = sensitivity.proxy_sensitivity(
        model.params,
        fisher,
        names=["layers.0.wq", "layers.0.wk", "layers.0.w_down"],
        widths=(4, 8),
        extrapolated={},
        quiet=True,
    )
    result["extrapolation_8bit"] = {
        n: {"kmeans": exact8[n][8], "extrapolated": analysis.sensitivity[n][8]} for n in exact8
    }
    result["load_average_end"] = os.getloadavg()
    save()
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
