"""How much of GPTQ's output-error gain survives a compact Gram matrix (top-r eigenpairs + the
exact diagonal)? The question a deterministic named build would need answered."""

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


def compact(g, r):
    vals, vecs = np.linalg.eigh(g)
    top = vecs[:, -r:] * vals[-r:]
    low = top @ vecs[:, -r:].T
    return low + np.diag(np.diag(g) - np.diag(low))


rows = []
for i in (0, 15, 29):
    for m in ("wq", "wo", "w_up", "w_down"):
        pw = comp.params["layers"][i][m]
        name = f"layers.{i}.{m}"
        g = grams[gram_name(name)].astype(np.float64)
        w = _as_matrix(np.asarray(flt.params["layers"][i][m], np.float32), pw.in_axes).astype(np.float64)
        s = np.asarray(pw.scales, np.float64)
        grid = np.asarray(pw.tables, np.float64)[np.arange(pw.n) // pw.group_rows]
        base = output_error(w, pw.matrix(), g)
        row = {"name": name, "bits": pw.bits, "nearest": 1.0}
        for r in (0, 8, 32, 64, None):
            gg = g if r is None else (np.diag(np.diag(g)) if r == 0 else compact(g, r))
            codes = assign_codes(w / s, grid, gg, damp=DAMP)
            q = grid[np.arange(pw.n)[None, :], codes] * s
            row["full" if r is None else f"r{r}"] = output_error(w, q, g) / base
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
json.dump(rows, open("/work/runs/s48/lowrank.json", "w"), indent=1)  # noqa: SIM115 (as it ran)
