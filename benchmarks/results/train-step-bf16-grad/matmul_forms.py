"""grad [1024, N] @ W^T on XLA:CPU, W^T made from packed-style tiles [N/16, K, 16]: fp32 (the code
before: W [K, N] then .T) against bf16 operands with fp32 sums in three layouts. Prints ms, GFLOP/s
and the largest difference relative to the largest fp32 value."""

import time

import jax
import jax.numpy as jnp
import numpy as np


def best_of_10(f, *args):
    jax.block_until_ready(f(*args))
    start = time.perf_counter()
    for _ in range(10):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - start) / 10


M = 1024
bf16, f32 = jnp.bfloat16, jnp.float32
for K, N in ((576, 1536), (1536, 576), (576, 576), (576, 192)):
    rng = np.random.default_rng(0)
    tiles = jnp.asarray(rng.random((N // 16, K, 16)), f32)
    g = jnp.asarray(rng.random((M, N)), f32)

    def w_kn(t):  # [K, N]
        return jnp.moveaxis(t, 0, 1).reshape(t.shape[1], -1)

    def w_nk(t):  # [N, K], made in that order
        return jnp.moveaxis(t, 2, 1).reshape(-1, t.shape[1])

    forms = {
        "fp32 g @ W.T": lambda g, t: g @ w_kn(t).T,
        "bf16 g @ Wt[N,K]": lambda g, t: jnp.dot(g.astype(bf16), w_nk(t).astype(bf16), preferred_element_type=f32),
        "bf16 (W g^T)^T": lambda g, t: (
            jax.lax.dot_general(
                w_kn(t).astype(bf16), g.astype(bf16), (((1,), (1,)), ((), ())), preferred_element_type=f32
            ).T
        ),
        "bf16 g @ W.T": lambda g, t: jax.lax.dot_general(
            g.astype(bf16), w_kn(t).astype(bf16), (((1,), (1,)), ((), ())), preferred_element_type=f32
        ),
    }
    reference = jax.jit(forms["fp32 g @ W.T"])(g, tiles)
    out = []
    for name, form in forms.items():
        f = jax.jit(form)
        seconds = best_of_10(f, g, tiles)
        error = float(jnp.max(jnp.abs(f(g, tiles) - reference)) / jnp.max(jnp.abs(reference)))
        out.append(f"{name} {seconds * 1e3:.2f} ms ({2 * M * K * N / seconds / 1e9:.0f} GFLOP/s, {error:.1e})")
    print(f"K={K} N={N}: " + " | ".join(out))
