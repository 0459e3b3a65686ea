"""If another CPU's XLA gave a Gram matrix differing in its last bits, how many GPTQ codes would change?"""

import json

import numpy as np

import afmkit
from afmkit.compress import sensitivity
from afmkit.compress.gptq import DAMP, assign_codes, gram_name, input_grams
from afmkit.compress.palettize import _as_matrix

flt = afmkit.load("smollm2-135m-instruct", dtype="float32")
comp = afmkit.load("smollm2-135m-instruct-3.5bpw", recovery=False)
cal = sensitivity.read_calibration(
    "/work/runs/s48/mix/recovery_mix_text.txt", flt.tokenizer, start=0, tokens=8192, seq_len=512
)
grams = input_grams(flt.config, flt.params, cal.windows, quiet=True)
rng = np.random.default_rng(0)
for i, m in ((0, "wq"), (15, "w_up"), (15, "w_down"), (29, "w_down")):
    pw = comp.params["layers"][i][m]
    g = grams[gram_name(f"layers.{i}.{m}")].astype(np.float64)
    w = _as_matrix(np.asarray(flt.params["layers"][i][m], np.float32), pw.in_axes).astype(np.float64)
    s = np.asarray(pw.scales, np.float64)
    grid = np.asarray(pw.tables, np.float64)[np.arange(pw.n) // pw.group_rows]
    ref = assign_codes(w / s, grid, g, damp=DAMP)
    out = {"name": f"layers.{i}.{m}", "bits": pw.bits}
    for eps in (1e-7, 1e-6):
        noise = 1 + eps * rng.standard_normal(g.shape)
        gp = g * (noise + noise.T) / 2
        out[f"differ_{eps:g}"] = float((assign_codes(w / s, grid, gp, damp=DAMP) != ref).mean())
    print(json.dumps(out), flush=True)
    open("/work/runs/s48/perturb.jsonl", "a").write(json.dumps(out) + "\n")  # noqa: SIM115 (as it ran)
