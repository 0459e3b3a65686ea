"""The packed-weight matmul of one SmolLM2 layer (q, k, v, o, gate, up, down) against XLA's fp32 dot.

    python benchmarks/packed_matmul.py                  # this CPU's kernel path, 1 to 512 rows
    AFMKIT_KERNEL_FLAGS=-mno-avx512f python benchmarks/packed_matmul.py --paths fp32   # the AVX2 code

Each figure is the best of ``--repeats`` calls, in CPU seconds of this process (all threads), so
other jobs on a shared machine disturb it less than wall time would; compare paths within a run.
Paths: ``bf16`` and ``fp32`` (the kernel's two modes; bf16 needs AVX512-BF16), ``xla`` (fp32
dot on the dequantized weights, what an fp32 model runs) and ``xla-dequantize`` (the packed
weight dequantized inside the jitted call: the kernels-off fallback).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from afmkit import kernels
from afmkit.model import packed as P

# SmolLM2-135M: d = 576, 9 query heads and 3 KV heads of 64, FFN 1536; [inputs, outputs]
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def best_cpu_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.process_time() - start)
    return min(times)


def layer_seconds(path: str, rows: int, bits: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    total = 0.0
    for k, n in SHAPES:
        weight = P.pack(rng.standard_normal((k, n)).astype(np.float32), bits)
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        if path == "xla":
            total += best_cpu_seconds(jax.jit(jnp.dot), x, jnp.asarray(P.unpack_numpy(weight)), repeats=repeats)
        elif path == "xla-dequantize":
            total += best_cpu_seconds(jax.jit(lambda x, w: jnp.dot(x, w.matrix())), x, weight, repeats=repeats)
        else:
            call = jax.jit(lambda x, p, s, n=n: kernels.packed_matmul(x, p, s, bits=bits, n=n, bf16=path == "bf16"))
            total += best_cpu_seconds(call, x, weight.packed, weight.scales, repeats=repeats)
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
        paths = [p for p in paths if p.startswith("xla")]
    elif not kernels.has_bf16():
        paths = [p for p in paths if p != "bf16"]
    flops_per_row = 2 * sum(k * n for k, n in SHAPES)
    for path in paths:
        for rows in (int(r) for r in args.rows.split(",")):
            seconds = layer_seconds(path, rows, args.bits, args.repeats)
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
