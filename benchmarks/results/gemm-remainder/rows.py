"""A decode step's 210 palettized matmuls of the 3.5-bit build (no adapter) at several row counts,
best of 3 x 10 calls, ms (session 47: the bf16 GEMM's remainder rows; results.jsonl transcribes the
printed lines of two runs of each build, the source swapped with git stash between them)."""

import json
import time

import jax
import jax.numpy as jnp

import afmkit
from afmkit.model.palettized import palettized_linear

m = afmkit.load("smollm2-135m-instruct-3.5bpw", recovery=False)
layers = m.params["layers"]
inputs = {"wq": (576,), "wk": (576,), "wv": (576,), "wo": (9, 64), "w_gate": (576,), "w_up": (576,), "w_down": (1536,)}


def step(params, rows):
    total = 0.0
    for i, layer in enumerate(params):
        for name, shape in inputs.items():
            total = total + jnp.sum(palettized_linear(jnp.full((rows, *shape), 0.01 * (i + 1)), layer[name]))
    return total


out = {}
for rows in (1, 8, 10, 16, 17):
    f = jax.jit(lambda p, rows=rows: step(p, rows))
    f(layers).block_until_ready()
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(10):
            f(layers).block_until_ready()
        best = min(best, (time.perf_counter() - t) / 10 * 1e3)
    out[rows] = round(best, 2)
print(json.dumps(out))
