"""The palettized-weight matmul of one SmolLM2 layer (q, k, v, o, gate, up, down): afmkit's native
kernel against the XLA path it replaces and against the packed int4 kernel.

    python benchmarks/palettized_matmul.py                          # 1 and 512 rows, 2/4/mixed bits
    python benchmarks/palettized_matmul.py --out benchmarks/results/palettized_matmul.json

Each figure is the best of ``--repeats`` calls, in CPU seconds of this process (all threads), so
other jobs on a shared machine disturb it less than wall time would; the paths are called in turn
for each matrix (rotating which goes first), so a change of load between paths shows up in all of
them; compare paths within a run. Paths: ``kernel`` (``kernels.palettized_matmul``: table entries
expanded in registers), ``xla-dequantize`` (the weight expanded inside the jitted call by XLA, the
path without kernels and the only one before the kernel), ``int4`` (the same matrix packed at 4 bits
for ``kernels.packed_matmul``, what ``--dtype int4`` runs: bf16 dot products where the CPU has them),
``kernel-int8`` (``--activations int8``: x quantized per row to int8 and multiplied by the int8 tables
with ``kernels.palettized_matmul(..., int8_activations=True)``, VNNI where the CPU has it; the quantization of x included).
Bits: 2, 4 or ``mixed`` (the per-matrix widths the 3.5-bit allocation gives most of SmolLM2's layers:
q, gate, up and down at 3 bits, k, v and o at 4).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from afmkit import kernels
from afmkit.model import packed as P
from afmkit.model import palettized as PL
from afmkit.model.palettized import from_codes
from layer_matmul import SHAPES, best_cpu_seconds

MIXED = (3, 4, 4, 4, 3, 3, 3)  # bits of q, k, v, o, gate, up, down


def weights(k: int, n: int, bits: int, rng: np.random.Generator) -> tuple:
    """A random palettized [k, n] weight (16-row tables, per-row scales) and its int4 packing."""
    codes = rng.integers(0, 2**bits, size=(k, n))
    tables = rng.standard_normal((n // 16, 2**bits)).astype(np.float16)
    scales = rng.uniform(0.5, 2, size=n).astype(np.float16)
    weight = from_codes(codes, tables, scales, bits=bits, shape=(k, n))
    return weight, P.pack(rng.standard_normal((k, n)).astype(np.float32), 4)


def call(path: str, x: jax.Array, weight, packed: P.PackedWeight) -> tuple:
    """The function that multiplies x by the weight on this path, and its arguments."""
    if path == "xla-dequantize":
        return jax.jit(lambda x, w: jnp.dot(x, w.matrix())), (x, weight)
    if path == "int4":
        bf16 = kernels.has_bf16() and x.shape[0] > 1  # as packed_matmul: bf16 where the CPU has it
        run = jax.jit(lambda x, p, s: kernels.packed_matmul(x, p, s, bits=4, n=packed.n, bf16=bf16))
        return run, (x, packed.packed, packed.scales)
    if path == "kernel-int8":
        return jax.jit(PL.palettized_matmul), (x, dataclasses.replace(weight, activation_bits=8))
    # the model's own call: the native kernel, bf16 where the CPU has AVX512-BF16
    return jax.jit(PL.palettized_matmul), (x, weight)


def layer_seconds(paths: list[str], rows: int, widths: tuple[int, ...], repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    total = dict.fromkeys(paths, 0.0)
    for (k, n), bits in zip(SHAPES, widths):
        weight, packed = weights(k, n, bits, rng)
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        best = best_cpu_seconds({path: call(path, x, weight, packed) for path in paths}, repeats)
        for path in paths:
            total[path] += best[path]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,512", help="comma-separated batch sizes (rows of x)")
    parser.add_argument("--bits", default="2,4,mixed", help="comma-separated: 2, 3, 4, 8 or mixed")
    parser.add_argument("--paths", default="kernel,kernel-int8,xla-dequantize,int4")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", help="also write the records to this JSON file")
    args = parser.parse_args()
    paths = args.paths.split(",")
    if not kernels.available():
        paths = [p for p in paths if p.startswith("xla")]
    records = []
    for bits in args.bits.split(","):
        widths = MIXED if bits == "mixed" else (int(bits),) * len(SHAPES)
        for rows in (int(r) for r in args.rows.split(",")):
            seconds = layer_seconds(paths, rows, widths, args.repeats)
            for path in paths:
                record = {
                    "path": path,
                    "kernels": kernels.describe(),
                    "int8_kernel": kernels.palettized_int8_isa(),
                    "bits": bits,
                    "rows": rows,
                    "layer_ms": round(seconds[path] * 1e3, 3),
                    "vs_xla_dequantize": round(seconds["xla-dequantize"] / seconds[path], 2)
                    if "xla-dequantize" in seconds
                    else None,
                    "vs_kernel": round(seconds["kernel"] / seconds[path], 2) if "kernel" in seconds else None,
                }
                records.append(record)
                print(json.dumps(record), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "palettized_matmul", "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
