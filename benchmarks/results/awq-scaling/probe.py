"""AWQ-style input-channel scaling before palettization: does it lower a layer's output error?

For a matrix W [K, N] with inputs x (Gram H = E[x x^T] on calibration text), scale input k by
s_k = rms(x_k)^alpha (normalised to geometric mean 1): palettize W' = diag(s) W with the named
build's bits and k-means importance (divided by s_k^2, the importance of the scaled entry), then
undo the scale, Q = diag(1/s) Q', and measure the output error tr((W - Q)^T H (W - Q)) against
alpha = 0's, for nearest and GPTQ indices (GPTQ sees H' = H / (s s^T), the scaled inputs' Gram).
The scale would be folded into the norm before (attention_in, mlp_in) or the matrix before
(w_up's columns for w_down), so the float model is unchanged.

usage: probe.py CALIBRATION_FILE > probe.jsonl
"""

import json
import sys

import numpy as np

import afmkit
from afmkit.compress import sensitivity
from afmkit.compress.gptq import InputGrams, gram_name, output_error
from afmkit.compress.named import committed_resources
from afmkit.compress.palettize import _as_matrix, palettize_matrix
from afmkit.weights import NAMED_COMPRESSED

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
flt = afmkit.load("smollm2-135m-instruct", dtype="float32")
recipe, importance = committed_resources(NAMED_COMPRESSED["smollm2-135m-instruct-3.5bpw"], flt)
cal = sensitivity.read_calibration(sys.argv[1], flt.tokenizer, start=0, tokens=8192, seq_len=512)
grams = InputGrams(flt.config, flt.params, cal.windows, quiet=True)

for layer in (0, 8, 15, 22, 29):
    for m in ("wq", "wk", "wv", "w_gate", "w_up", "w_down"):
        name = f"layers.{layer}.{m}"
        w = _as_matrix(np.asarray(flt.params["layers"][layer][m], np.float64), (0,))  # [K, N]: in_axes=(0,)
        h = grams[gram_name(name)].astype(np.float64)
        imp = _as_matrix(np.asarray(importance[name], np.float64), (0,))
        rms = np.sqrt(np.maximum(np.diag(h), 1e-12))
        row = {"name": name, "bits": recipe.bits[name]}
        for codes in ("nearest", "gptq"):
            base = None
            for alpha in ALPHAS:
                s = rms**alpha
                s = s / np.exp(np.mean(np.log(s)))
                pw = palettize_matrix(
                    (w * s[:, None]).astype(np.float32),
                    recipe.bits[name],
                    importance=(imp / np.square(s)[:, None]).astype(np.float32),
                    gram=None if codes == "nearest" else h / np.outer(s, s),
                )
                err = output_error(w, np.asarray(pw.matrix(), np.float64) / s[:, None], h)
                base = err if base is None else base
                row[f"{codes}_{alpha}"] = round(err / base, 4)
        print(json.dumps(row), flush=True)
