"""Potential of re-fitting the look-up tables to GPTQ's indices (least squares under H), then GPTQ again."""

import json

import numpy as np

import afmkit
from afmkit.compress import sensitivity
from afmkit.compress.gptq import DAMP, assign_codes, gram_name, input_grams, output_error
from afmkit.compress.palettize import _as_matrix

flt = afmkit.load("smollm2-135m-instruct", dtype="float32")
comp = afmkit.load("smollm2-135m-instruct-3.5bpw", recovery=False)
cal = sensitivity.read_calibration(
    "/work/runs/s48/mix/recovery_mix_text.txt", flt.tokenizer, start=0, tokens=8192, seq_len=512
)
grams = input_grams(flt.config, flt.params, cal.windows, quiet=True)


def refit(w, s, codes, h, levels, group_rows, tables):
    k, n = w.shape
    new = tables.copy()
    for g in range(n // group_rows):
        m = np.zeros((levels, levels))
        r = np.zeros(levels)
        for col in range(g * group_rows, (g + 1) * group_rows):
            o = np.zeros((k, levels))
            o[np.arange(k), codes[:, col]] = 1
            ho = h @ o
            m += s[col] ** 2 * (o.T @ ho)
            r += s[col] * (ho.T @ w[:, col])
        used = np.diag(m) > 0
        sol = np.linalg.lstsq(m[np.ix_(used, used)], r[used], rcond=None)[0]
        new[g, used] = sol
    return new.astype(np.float16).astype(np.float64)


def quantized(tables, codes, rows, s):
    return tables[rows][np.arange(len(rows))[None, :], codes] * s


for i, m in ((0, "wq"), (15, "wo"), (15, "w_up"), (15, "w_down"), (29, "w_down")):
    pw = comp.params["layers"][i][m]
    h = grams[gram_name(f"layers.{i}.{m}")].astype(np.float64)
    w = _as_matrix(np.asarray(flt.params["layers"][i][m], np.float32), pw.in_axes).astype(np.float64)
    s = np.asarray(pw.scales, np.float64)
    tables = np.asarray(pw.tables, np.float64)
    rows = np.arange(pw.n) // pw.group_rows
    base = output_error(w, pw.matrix(), h)
    out = {"name": f"layers.{i}.{m}", "bits": pw.bits}
    codes = assign_codes(w / s, tables[rows], h, damp=DAMP)
    out["gptq"] = output_error(w, quantized(tables, codes, rows, s), h) / base
    for it in range(2):
        tables = refit(w, s, codes, h, 2**pw.bits, pw.group_rows, tables)
        out[f"refit{it}"] = output_error(w, quantized(tables, codes, rows, s), h) / base
        codes = assign_codes(w / s, tables[rows], h, damp=DAMP)
        out[f"regptq{it}"] = output_error(w, quantized(tables, codes, rows, s), h) / base
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}), flush=True)
