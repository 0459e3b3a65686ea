"""Predictions for a choice of bits: size, decode and prefill time per token, energy per token and
quality change. The page computes the same in JavaScript (``static/talaria.js``, ``predict``) so
that a what-if updates instantly; ``tests/talaria`` checks that the two agree.

* **Time on a profile** (a roofline): each op takes ``max(FLOPs / peak, bytes / bandwidth)``;
  the model's time is the sum over ops (ops run one after another at batch 1).
* **Time on this CPU, measured**: the sum of each op's micro-benchmark at its format
  (``analysis.benchmark_ops``); this is the prediction checked against the engine's decode.
* **Energy**: ``FLOPs * pJ/FLOP + bytes * pJ/byte`` summed over ops (estimates, see profiles).
* **Quality**: the compressor's sensitivities add (``compress.allocate``'s assumption): the loss
  rises by ``sum of sensitivity[matrix][bits]`` nats per token, so perplexity is predicted as
  ``float perplexity * exp(that)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def row_format(row: Mapping[str, Any], bits: Mapping[str, int], embed_bits: int) -> str:
    if row["group"] == "matrix":
        return str(bits[row["name"]])
    if row["group"] in ("embedding", "head"):
        return str(embed_bits)
    return "-"


def predict(analysis: Mapping[str, Any], bits: Mapping[str, int], embed_bits: int = 8) -> dict[str, Any]:
    """Every prediction the page shows, for ``bits`` (matrix name -> width) and ``embed_bits``."""
    profiles = analysis["profiles"]
    out: dict[str, Any] = {
        "size_bytes": 0.0,
        "matrix_bits": 0.0,
        "matrix_weights": 0,
        "measured_decode_s": 0.0,
        "measured_prefill_s": 0.0,
        "loss_rise": 0.0,
        "profiles": {p["name"]: {"decode_s": 0.0, "prefill_s": 0.0, "energy_j": 0.0} for p in profiles},
    }
    for row in analysis["rows"]:
        fmt = row_format(row, bits, embed_bits)
        if row["group"] == "matrix":
            weights = row["k"] * row["n"]
            stored = row["bytes_decode"][fmt] - 4 * (row["k"] + row["n"])
            out["size_bytes"] += stored
            out["matrix_bits"] += 8 * stored
            out["matrix_weights"] += weights
            out["loss_rise"] += row["sensitivity"][fmt]
        elif row["group"] == "embedding":
            out["size_bytes"] += row["params"] * (int(fmt) / 8) + row["params"] / 32 * 2
        elif row["group"] == "norm":
            out["size_bytes"] += 4 * row["params"]
        out["measured_decode_s"] += row["measured_decode"][fmt]
        out["measured_prefill_s"] += row["measured_prefill"][fmt]
        for p in profiles:
            for mode in ("decode", "prefill"):
                flops, moved = row[f"flops_{mode}"], row[f"bytes_{mode}"][fmt]
                out["profiles"][p["name"]][f"{mode}_s"] += max(flops / p["peak_flops"], moved / p["bandwidth"])
            energy = row["flops_decode"] * p["pj_per_flop"] + row["bytes_decode"][fmt] * p["pj_per_byte"]
            out["profiles"][p["name"]]["energy_j"] += energy * 1e-12
    out["bits_per_weight"] = out["matrix_bits"] / out["matrix_weights"]
    out["perplexity"] = analysis["eval"]["float_perplexity"] * math.exp(out["loss_rise"])
    return out
