"""What one call of the palettized kernel costs at one row: 50 matmuls of distinct random 4-bit
weights chained in one jitted function (each call's input depends on the previous output),
against the same chain without the kernel. Microseconds per call, (best, median) of 50 runs."""

import time

import jax
import numpy as np

from afmkit.model import palettized as PL
from afmkit.model.palettized import from_codes

rng = np.random.default_rng(0)
REP = 50


def weight(k, n, bits):
    codes = rng.integers(0, 2**bits, size=(k, n))
    tables = rng.standard_normal((n // 16, 2**bits)).astype(np.float16)
    scales = rng.uniform(0.5, 2, size=n).astype(np.float16)
    return from_codes(codes, tables, scales, bits=bits, shape=(k, n))


def bench(f, *args):
    f(*args).block_until_ready()
    times = []
    for _ in range(50):
        start = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return np.min(times) / REP * 1e6, np.median(times) / REP * 1e6


def chain(x, weights):
    total = 0.0
    for w in weights:
        y = PL.palettized_matmul(x, w)[0, 0]
        total = total + y
        x = x * (1 + y * 1e-30)
    return total


def chain_without_kernel(x, weights):
    total = 0.0
    for w in weights:
        y = (x[0, :16] * w.tables[0, 0]).sum()
        total = total + y
        x = x * (1 + y * 1e-30)
    return total


for k, n in [(32, 16), (576, 16), (576, 64), (576, 192), (576, 576), (576, 1536)]:
    weights = [weight(k, n, 4) for _ in range(REP)]
    x = jax.numpy.asarray(rng.standard_normal((1, k)).astype(np.float32))
    kernel, without = bench(jax.jit(chain), x, weights), bench(jax.jit(chain_without_kernel), x, weights)
    print(f"{k}x{n}: kernel min/med {kernel}  no-kernel {without}", flush=True)
