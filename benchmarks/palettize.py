"""Data-free palettization of SmolLM2-135M-Instruct (docs/compression.md, "Palettization").

Times the exact k-means of all 210 layer matrices (16-row groups, 16 and 4 centroids) and
scores float, uniform 4-bit with and without per-row scale, 3-bit and 2-bit palettized models by
perplexity on the first --eval-chars characters of tiny shakespeare (512-token windows, stride
512; the text is never used for calibration here: no importance weights). Prints JSON lines.

    python benchmarks/palettize.py [--eval-chars 60000] [--skip-perplexity]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import afmkit
from afmkit.compress import kmeans
from afmkit.compress.palettize import LAYER_MATRICES, _as_matrix, bits_per_weight, palettize_params
from afmkit.eval.perplexity import perplexity_of_text, read_text
from afmkit.files import shared_data_dir
from afmkit.model.packed import INPUT_AXES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-chars", type=int, default=60_000)
    parser.add_argument("--skip-perplexity", action="store_true")
    args = parser.parse_args()
    model = afmkit.load("smollm2-135m-instruct", dtype="float32")

    def report(**fields) -> None:
        print(json.dumps({**fields, "load_average": os.getloadavg()[0]}), flush=True)

    # k-means alone: the groups palettize_matrix clusters (rows scaled), every matrix
    groups = []
    for layer in model.params["layers"]:
        for name in LAYER_MATRICES:
            w = _as_matrix(np.asarray(layer[name]), INPUT_AXES[name]).astype(np.float64)
            w = w / np.abs(w).max(axis=0).astype(np.float16).astype(np.float64)
            k, n = w.shape
            groups.append(w.reshape(k, n // 16, 16).transpose(1, 0, 2).reshape(n // 16, -1))
    for bits in (4, 2):
        start, cpu = time.perf_counter(), time.process_time()
        for g in groups:
            kmeans.kmeans1d_groups(g, 2**bits)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        report(phase="k-means", bits=bits, matrices=len(groups), seconds=seconds, cpu_seconds=cpu_seconds)
    if args.skip_perplexity:
        return
    text = read_text(shared_data_dir() / "pretrain" / "tinyshakespeare_input.txt", max_chars=args.eval_chars)

    def perplexity(params) -> float:
        scored = afmkit.LanguageModel(model.config, params, model.tokenizer, name="palettized")
        return perplexity_of_text(scored, text, seq_len=512, stride=512).perplexity

    report(method="float", bits_per_weight=32, perplexity=perplexity(model.params))
    for bits, scale in ((4, True), (4, False), (3, True), (2, True)):
        start = time.perf_counter()
        params = palettize_params(model.params, bits, per_row_scale=scale)
        seconds = time.perf_counter() - start
        report(
            method=f"{bits}-bit" + (" + row scale" if scale else ""),
            bits_per_weight=bits_per_weight(params),
            palettize_seconds=seconds,
            perplexity=perplexity(params),
        )


if __name__ == "__main__":
    main()
