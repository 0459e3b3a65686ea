"""The packed-weight matmul of one SmolLM2 layer (q, k, v, o, gate, up, down) against XLA's fp32 dot.

    python benchmarks/packed_matmul.py                  # this CPU's kernel path, 1 to 512 rows
    AFMKIT_KERNEL_FLAGS=-mno-avx512f python benchmarks/packed_matmul.py --paths fp32   # the AVX2 code

Each figure is the best of ``--repeats`` calls, in CPU seconds of this process (all threads), so
other jobs on a shared machine disturb it less than wall time would; the paths are called in turn
for each matrix (rotating which goes first), so a change of load between paths shows up in all of
them; compare paths within a run. Paths: ``bf16`` and ``fp32`` (the kernel's two modes; bf16
needs AVX512-BF16), ``xla`` (fp32 dot on the dequantized weights, what an fp32 model runs),
``xla-dequantize`` (the packed weight dequantized inside the jitted call: the kernels-off
fallback) and ``numpy`` (numpy's BLAS on the dequantized weights: with ``OPENBLAS_NUM_THREADS=1
OPENBLAS_CORETYPE=Haswell`` a tuned AVX2 fp32 GEMM, what an AVX2 build's kernel competes with on
an AVX2-only CPU, where this machine's XLA would use AVX-512).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from afmkit import kernels
from afmkit.model import packed as P
from layer_matmul import SHAPES, best_cpu_seconds


def call(path: str, x: jax.Array, weight: P.PackedWeight) -> tuple:
    """The function that multiplies x by the weight on this path, and its arguments."""
    if path == "xla":
        return jax.jit(jnp.dot), (x, jnp.asarray(P.unpack_numpy(weight)))
    if path == "xla-dequantize":
        return jax.jit(lambda x, w: jnp.dot(x, w.matrix())), (x, weight)
    if path == "numpy":
        return np.matmul, (np.asarray(x), P.unpack_numpy(weight))
    bits, n, bf16 = weight.bits, weight.n, path == "bf16"
    kernel = jax.jit(lambda x, p, s: kernels.packed_matmul(x, p, s, bits=bits, n=n, bf16=bf16))
    return kernel, (x, weight.packed, weight.scales)


def layer_seconds(paths: list[str], rows: int, bits: int, repeats: int) -> dict[str, float]:
    """Each path's CPU seconds for one layer: per matrix the best of ``repeats`` calls, the paths
    called in turn."""
    rng = np.random.default_rng(0)
    total = dict.fromkeys(paths, 0.0)
    for k, n in SHAPES:
        weight = P.pack(rng.standard_normal((k, n)).astype(np.float32), bits)
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        best = best_cpu_seconds({path: call(path, x, weight) for path in paths}, repeats)
        for path in paths:
            total[path] += best[path]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,16,64,512", help="comma-separated batch sizes (rows of x)")
    parser.add_argument("--paths", default="bf16,fp32,xla,xla-dequantize")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    paths = args.paths.split(",")
    if not kernels.available():
        paths = [p for p in paths if p.startswith("xla") or p == "numpy"]
    elif not kernels.has_bf16():
        paths = [p for p in paths if p != "bf16"]
    flops_per_row = 2 * sum(k * n for k, n in SHAPES)
    for rows in (int(r) for r in args.rows.split(",")):
        for path, seconds in layer_seconds(paths, rows, args.bits, args.repeats).items():
            record = {
                "path": path,
                "kernels": kernels.describe(),
                "rows": rows,
                "bits": args.bits,
                "layer_ms": round(seconds * 1e3, 3),
                "gflop_per_cpu_s": round(flops_per_row * rows / seconds / 1e9, 1),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
