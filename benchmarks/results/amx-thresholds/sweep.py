"""Where the kernels' row thresholds should sit on a CPU with AMX: one SmolLM2 layer's 7 matmuls
(10 layers of distinct random weights, each call's input made from the previous output, as in a
step) at M rows, for kernels built with other thresholds. Every path gives the same bits (the
kernel tests check it), so a threshold is a speed choice only.

    python sweep.py palettized KDIRECT   # the palettized kernel: direct path up to KDIRECT rows, tiles above
    python sweep.py int4 KAMX            # the int4 kernel: row kernels below KAMX rows, tiles from KAMX

Run from a copy of src/ with the constant changed (run.sh makes them). Prints one JSON line.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from afmkit import kernels
from afmkit.model import packed as P
from afmkit.model import palettized as PL
from afmkit.model.palettized import from_codes

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
MIXED = (3, 4, 4, 4, 3, 3, 3)  # the 3.5-bit allocation's usual widths of q, k, v, o, gate, up, down
LAYERS = 10
ROWS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 32)

kind, threshold = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)


def palettized(k, n, bits):
    codes = rng.integers(0, 2**bits, size=(k, n))
    tables = rng.standard_normal((n // 16, 2**bits)).astype(np.float16)
    scales = rng.uniform(0.5, 2, size=n).astype(np.float16)
    return from_codes(codes, tables, scales, bits=bits, shape=(k, n))


if kind == "palettized":
    layers = [[palettized(k, n, b) for (k, n), b in zip(SHAPES, MIXED)] for _ in range(LAYERS)]

    def matmul(x, w):
        return PL.palettized_matmul(x, w)
else:
    layers = [
        [P.pack(rng.standard_normal((k, n)).astype(np.float32) * 0.05, 4) for k, n in SHAPES] for _ in range(LAYERS)
    ]

    def matmul(x, w):
        return kernels.packed_matmul(x, w.packed, w.scales, bits=4, n=w.n, bf16=True)


@jax.jit
def chain(x, layers):
    """Each layer: q, k, v, o, gate and up of x, down of gate * up; x moves by a little of each."""
    for q, k, v, o, gate, up, down in layers:
        mixed = sum(matmul(x, w)[:, :192].sum(1, keepdims=True) for w in (q, k, v, o)) * 1e-6
        hidden = matmul(x, gate) * matmul(x, up) * 1e-3
        x = x + matmul(hidden, down) * 1e-3 + mixed
    return x


record = {"kind": kind, "threshold": threshold, "kernels": kernels.describe(), "ms_per_layer": {}}
for m in ROWS:
    x = jnp.asarray(rng.standard_normal((m, 576)).astype(np.float32))
    chain(x, layers).block_until_ready()
    times = []
    for _ in range(15):
        start = time.perf_counter()
        chain(x, layers).block_until_ready()
        times.append(time.perf_counter() - start)
    record["ms_per_layer"][m] = round(float(np.median(times)) * 1000 / LAYERS, 4)
print(json.dumps(record))
