"""Seconds to choose one matrix's indices (assign_codes) for each matrix shape of SmolLM2, on
random inputs of that shape (the time does not depend on the values). Writes codes_time.json."""

import json
import time
from pathlib import Path

import numpy as np

from afmkit.compress.gptq import DAMP, assign_codes

rng = np.random.default_rng(0)
results = []
for name, k, n, levels in (
    ("wq", 576, 576, 8),
    ("wk", 576, 192, 16),
    ("w_up", 576, 1536, 8),
    ("w_down", 1536, 576, 16),
):
    x = rng.standard_normal((4 * k, k))
    gram = x.T @ x / len(x)
    w = rng.standard_normal((k, n))
    grid = np.sort(rng.standard_normal((n, levels)), axis=1)
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        assign_codes(w, grid, gram, damp=DAMP)
        times.append(time.perf_counter() - begin)
    results.append({"matrix": name, "k": k, "n": n, "levels": levels, "seconds": times})
    print(json.dumps(results[-1]))
Path(__file__).with_name("codes_time.json").write_text(json.dumps(results, indent=1) + "\n")
