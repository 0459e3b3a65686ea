"""Which arithmetic reproduces TDPBF16PS bit for bit? Reads dump.bin (written by dump.c: per trial a
16x32 bf16 input tile A, a 16x32 bf16 weight tile B of pairs, a random 16x16 fp32 tile C0 and the
tile C1 = C0 + A B that one tdpbf16ps returned) and scores candidate models of one instruction by the
share of the 256 outputs per trial they reproduce exactly.

    gcc -O2 -march=native -mamx-tile -mamx-bf16 dump.c -o dump
    ./dump TRIALS SPREAD C0_SCALE && python models.py TRIALS

SPREAD: inputs are uniform(-0.5, 0.5) times 2^(0..SPREAD-1) (wider spreads make more roundings);
C0_SCALE 0 starts every sum from zero.
"""

import math
import sys
from fractions import Fraction

import numpy as np

f32 = np.float32


def load(path="dump.bin"):
    raw = np.fromfile(path, dtype=np.uint8)
    size = 16 * 32 * 2 * 2 + 16 * 16 * 4 * 2
    for t in range(raw.size // size):
        r = raw[t * size : (t + 1) * size]
        a = (r[:1024].view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(16, 32)
        b = (r[1024:2048].view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(16, 32)
        yield a, b, r[2048:3072].view(np.float32).reshape(16, 16), r[3072:].view(np.float32).reshape(16, 16)


def sequential(c0, products):  # C0 + p0 + p1 + ... + p31, fp32, in order
    s = f32(c0)
    for v in products:
        s = f32(s + f32(v))
    return s


def pairs_odd_first(c0, products):  # vdpbf16ps: per pair, the odd product, then the even one
    s = f32(c0)
    for i in range(0, 32, 2):
        s = f32(f32(s + f32(products[i + 1])) + f32(products[i]))
    return s


def exact_once(c0, products):  # C0 + the exact sum, one rounding
    total = Fraction(float(c0)) + sum(Fraction(float(v)) for v in products)
    return f32(total.numerator / total.denominator)


def pair_sums_in_order(c0, products):  # each pair's sum rounded, then added in order
    s = f32(c0)
    for i in range(0, 32, 2):
        s = f32(s + f32(f32(products[i]) + f32(products[i + 1])))
    return s


def even_odd_then_add(c0, products):  # the model the kernel emulates: even and odd sums from zero, C0 + (even + odd)
    even, odd = sequential(0, products[0::2]), sequential(0, products[1::2])
    return f32(f32(c0) + f32(even + odd))


def even_odd_c0_first(c0, products):  # the same sums, added as (C0 + even) + odd
    even, odd = sequential(0, products[0::2]), sequential(0, products[1::2])
    return f32(f32(f32(c0) + even) + odd)


def aligned(bits):  # every term cut to `bits` bits below the largest exponent (a wide adder), one rounding
    def model(c0, products):
        terms = [float(c0)] + [float(v) for v in products]
        exponents = [math.frexp(t)[1] for t in terms if t]
        if not exponents:
            return f32(0)
        unit = Fraction(2) ** (max(exponents) - bits)
        total = sum(math.trunc(Fraction(t) / unit) * unit for t in terms)
        return f32(total.numerator / total.denominator)

    return model


MODELS = {
    "sequential in order": sequential,
    "vdpbf16ps (odd then even per pair)": pairs_odd_first,
    "exact sum, one rounding": exact_once,
    "pair sums in order": pair_sums_in_order,
    "aligned to 28 bits, truncated": aligned(28),
    "even and odd sums, then C0 + (even + odd)": even_odd_then_add,
    "even and odd sums, then (C0 + even) + odd": even_odd_c0_first,
}

if __name__ == "__main__":
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    hits = dict.fromkeys(MODELS, 0)
    outputs = 0
    for t, (a, b, c0, c1) in enumerate(load()):
        if t == trials:
            break
        for i in range(16):
            for j in range(16):
                products = [np.float64(a[i, k]) * np.float64(b[k // 2, 2 * j + k % 2]) for k in range(32)]
                outputs += 1
                for name, model in MODELS.items():
                    hits[name] += model(c0[i, j], products).view(np.uint32) == c1[i, j].view(np.uint32)
    for name, hit in hits.items():
        print(f"{hit / outputs:7.2%}  {name}")
    print(f"({outputs} outputs)")
