"""Kernel-level: the 210 palettized matmuls of a step at M rows, with the recovery adapter fused in
the kernel (fp16 factors) against the kernel then XLA's LoRA products (fp32 factors, and fp16
converted in the step)."""
import json, time, sys
import jax, jax.numpy as jnp
import afmkit
from afmkit.model.palettized import palettized_linear
from afmkit.model.packed import low_rank_update

m = afmkit.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct-3.5bpw")
from afmkit.model.packed import packed_linear, PackedWeight
layers, ad = m.params["layers"], m.adapter.weights
names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
ins = {"wq": (576,), "wk": (576,), "wv": (576,), "wo": (9, 64), "w_gate": (576,), "w_up": (576,), "w_down": (1536,)}
scale = m.adapter.config.scale

def step(params, adapter, rows, mode):
    total = 0.0
    for i, layer in enumerate(params):
        for name in names:
            x = jnp.full((rows, *ins[name]), 0.01 * (i + 1))
            w = layer[name]
            lin = packed_linear if isinstance(w, PackedWeight) else palettized_linear
            a, b = adapter[i][name]["a"], adapter[i][name]["b"]
            if mode == "fused":
                y = lin(x, w, low_rank=(a, b, scale))
            else:
                y = lin(x, w)
                x2 = x.reshape(rows, -1)
                y = y + low_rank_update(x2, a.reshape(x2.shape[1], -1), b.reshape(b.shape[0], -1), scale).reshape(y.shape)
            total = total + jnp.sum(y)
    return total

ad16 = jax.tree.map(jnp.asarray, ad)
ad32 = jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), ad)
out = {}
for rows in tuple(int(r) for r in sys.argv[2].split(",")):
    cases = {"fused16": ("fused", ad16), "xla32": ("xla", ad32), "xla16": ("xla", ad16)}
    fns = {k: jax.jit(lambda p, a, mode=mode: step(p, a, rows, mode)) for k, (mode, _) in cases.items()}
    for k, (_, a) in cases.items():
        fns[k](layers, a).block_until_ready()
    res = {k: [] for k in cases}
    for _ in range(3):
        for k, (_, a) in cases.items():
            t = time.perf_counter()
            for _ in range(10):
                fns[k](layers, a).block_until_ready()
            res[k].append((time.perf_counter() - t) / 10 * 1e3)
    out[rows] = {k: round(min(v), 2) for k, v in res.items()}
    print(rows, out[rows], flush=True)
print(json.dumps(out))
