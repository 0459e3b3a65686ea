"""Paired bootstrap of the IFEval strict average (mean of prompt- and instruction-level strict
accuracy) between two eval folders over the same prompts: B - A, resampling prompts.

Usage: paired_bootstrap.py EVAL_A EVAL_B [DRAWS]"""

import json
import sys
from pathlib import Path

import numpy as np


def per_prompt(folder):
    rows = {}
    for line in (Path(folder) / "per_prompt.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["key"]] = (float(all(row["strict"])), sum(row["strict"]), len(row["strict"]))
    return rows


a, b = per_prompt(sys.argv[1]), per_prompt(sys.argv[2])
draws = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
keys = sorted(a)
if sorted(b) != keys:
    raise SystemExit("the two folders hold different prompts")
A, B = (np.array([rows[k] for k in keys]) for rows in (a, b))


def strict_average(table, index):
    chosen = table[index]
    return 50 * (chosen[:, 0].mean() + chosen[:, 1].sum() / chosen[:, 2].sum())


everything = np.arange(len(keys))
rng = np.random.default_rng(0)
samples = [strict_average(B, i) - strict_average(A, i) for i in rng.integers(0, len(keys), (draws, len(keys)))]
low, high = np.percentile(samples, [2.5, 97.5])
difference = strict_average(B, everything) - strict_average(A, everything)
print(
    json.dumps(
        {
            "a": sys.argv[1],
            "b": sys.argv[2],
            "b_minus_a": round(difference, 2),
            "interval_95": [round(low, 2), round(high, 2)],
            "draws": draws,
        }
    )
)
