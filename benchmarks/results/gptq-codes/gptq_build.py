"""GPTQ codes on the named 3.5-bit build's own tables and scales (only the indices change).
usage: gptq_build.py OUT CALIBRATION_FILE START TOKENS"""

import json
import sys
import time

import numpy as np

import afmkit
from afmkit.compress import sensitivity
from afmkit.compress.gptq import DAMP, assign_codes, gram_name, input_grams, output_error
from afmkit.compress.palettize import _as_matrix
from afmkit.interop import native
from afmkit.model.palettized import PalettizedWeight, from_codes

out_dir, cal_file, start, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
flt = afmkit.load("smollm2-135m-instruct", dtype="float32")
comp = afmkit.load("smollm2-135m-instruct-3.5bpw", recovery=False)
cal = sensitivity.read_calibration(cal_file, flt.tokenizer, start=start, tokens=tokens, seq_len=512)
t0 = time.time()
grams = input_grams(flt.config, flt.params, cal.windows)
t_stats = time.time() - t0
t0 = time.time()
layers, stats = [], []
for i, layer in enumerate(comp.params["layers"]):
    new = dict(layer)
    for m, pw in layer.items():
        if not isinstance(pw, PalettizedWeight):
            continue
        name = f"layers.{i}.{m}"
        w = _as_matrix(np.asarray(flt.params["layers"][i][m], np.float32), pw.in_axes).astype(np.float64)
        scales = np.asarray(pw.scales, np.float64)
        grid = np.asarray(pw.tables, np.float64)[np.arange(pw.n) // pw.group_rows]
        codes = assign_codes(w / scales, grid, grams[gram_name(name)], damp=DAMP)
        new[m] = from_codes(codes, pw.tables, pw.scales, bits=pw.bits, shape=pw.shape, in_axes=pw.in_axes)
        g = grams[gram_name(name)]
        stats.append(
            {
                "name": name,
                "bits": pw.bits,
                "err_nearest": output_error(w, pw.matrix(), g),
                "err_gptq": output_error(w, new[m].matrix(), g),
            }
        )
    layers.append(new)
    print("layer", i, round(time.time() - t0, 1), flush=True)
params = dict(comp.params, layers=layers)
native.save_checkpoint(out_dir, comp.config, params, comp.tokenizer)
json.dump(
    {
        "calibration": cal.info(),
        "damp": DAMP,
        "seconds": {"input_statistics": t_stats, "codes": time.time() - t0},
        "stats": stats,
    },
    open(f"{out_dir}/gptq_build.json", "w"),  # noqa: SIM115 (a record of the run, kept as it ran)
    indent=1,
)
print("saved", out_dir)
