"""The kernels alone (session 47): a decode step's 210 quantized matmuls of a named model at M rows,
with its adapter added inside the kernel (fp16 factors as stored) against the kernel followed by
XLA's LoRA products (fp32 factors; and fp16 factors XLA converts on every call). Best of 3, ms.

    python kernel_ab.py smollm2-135m-instruct-3.5bpw 1,16,512 > kernel_ab.json
"""

import json
import sys
import time

import jax
import jax.numpy as jnp

import afmkit
from afmkit.model.packed import PackedWeight, low_rank_update, packed_linear
from afmkit.model.palettized import palettized_linear

model = afmkit.load(sys.argv[1])
layers, adapter = model.params["layers"], model.adapter.weights
scale = model.adapter.config.scale
inputs = {"wq": (576,), "wk": (576,), "wv": (576,), "wo": (9, 64), "w_gate": (576,), "w_up": (576,), "w_down": (1536,)}


def step(params, factors, rows, path):
    total = 0.0
    for i, layer in enumerate(params):
        for name, shape in inputs.items():
            x = jnp.full((rows, *shape), 0.01 * (i + 1))
            w, (a, b) = layer[name], (factors[i][name]["a"], factors[i][name]["b"])
            quantized_linear = packed_linear if isinstance(w, PackedWeight) else palettized_linear
            if path == "kernel":
                y = quantized_linear(x, w, low_rank=(a, b, scale))
            else:
                y = quantized_linear(x, w)
                x2 = x.reshape(rows, -1)
                update = low_rank_update(x2, a.reshape(x2.shape[1], -1), b.reshape(b.shape[0], -1), scale)
                y = y + update.reshape(y.shape)
            total = total + jnp.sum(y)
    return total


fp16 = jax.tree.map(jnp.asarray, adapter)
fp32 = jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), adapter)
cases = {"fused16": ("kernel", fp16), "xla32": ("xla", fp32), "xla16": ("xla", fp16)}
out = {}
for rows in (int(r) for r in sys.argv[2].split(",")):
    fns = {
        name: jax.jit(lambda p, f, rows=rows, path=path: step(p, f, rows, path)) for name, (path, _) in cases.items()
    }
    for name, (_, factors) in cases.items():
        fns[name](layers, factors).block_until_ready()
    best = {}
    for _ in range(3):
        for name, (_, factors) in cases.items():
            start = time.perf_counter()
            for _ in range(10):
                fns[name](layers, factors).block_until_ready()
            best[name] = min(best.get(name, 1e9), (time.perf_counter() - start) / 10 * 1e3)
    out[rows] = {name: round(ms, 2) for name, ms in best.items()}
print(json.dumps(out))
