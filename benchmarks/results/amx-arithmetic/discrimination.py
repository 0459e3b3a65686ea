"""Does the bit-for-bit test tell the two arithmetics apart? The palettized kernel's bf16 output for
40 rows (3-bit, K = 1,112, the test's weight) against both transcriptions of
tests/model/test_palettized_kernel.py: the share of outputs each misses.

    PYTHONPATH=src:tests/model python benchmarks/results/amx-arithmetic/discrimination.py > discrimination.txt
"""

import jax.numpy as jnp
import numpy as np
import test_palettized_kernel as T

from afmkit import kernels

weight = T.Weight(3, 1112, 48, seed=3)
x = np.random.default_rng(3).normal(size=(40, 1112)).astype(np.float32)
w = T.to_bf16(weight.tables).astype(np.float32)[np.arange(48)[None, :] // 16, weight.codes]
got = np.asarray(
    T._kernel(jnp.asarray(x), weight.leaf.indices, weight.leaf.tables, weight.leaf.scales, bits=3, bf16=True)
)
print(f"kernel arithmetic here: {kernels.bf16_arithmetic()}")
for transcription in ("amx", "pairs"):
    want = T.bf16_sums(T.to_bf16(x), w, transcription) * weight.scales.astype(np.float32)
    print(f"{transcription:5s} transcription misses {(got != want).mean():.1%} of {got.size} outputs")
