"""512-token prefill of SmolLM2-135M in two dtypes, timed in turn in one process.

    python benchmarks/prefill_dtypes.py                     # int4 (packed) against float32
    AFMKIT_KERNEL_FLAGS=-mno-avx512bf16 python benchmarks/prefill_dtypes.py   # without bf16 dots

benchmarks/generation.py times each engine in its own process, one after another; on a machine
shared with other jobs the load changes between them. Here both models are loaded at once and
their prefills alternate (order swapped every round), so both see the same load; each figure is
the best of ``--repeats`` in CPU seconds of this process and in wall seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import afmkit
from afmkit import kernels
from afmkit.infer.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dtypes", default="int4,float32", help="two dtypes for afmkit.load; the first is divided by the second"
    )
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    engines = {}
    for dtype in dtypes:
        model = afmkit.load(dtype=dtype)
        engines[dtype] = Engine(model.config, model.params, model.tokenizer, eos_ids=())
    prompt = np.random.default_rng(0).integers(100, 40000, args.tokens).tolist()
    sampling = afmkit.SamplingParams(max_new_tokens=1)  # prefill and the first token
    for engine in engines.values():
        list(engine.stream([prompt], sampling))  # compile
    best = {dtype: [float("inf"), float("inf")] for dtype in dtypes}
    for i in range(args.repeats):
        for dtype in dtypes if i % 2 == 0 else dtypes[::-1]:
            cpu, wall = time.process_time(), time.perf_counter()
            list(engines[dtype].stream([prompt], sampling))
            best[dtype] = [
                min(best[dtype][0], time.process_time() - cpu),
                min(best[dtype][1], time.perf_counter() - wall),
            ]
    record = {"kernels": kernels.describe(), "tokens": args.tokens}
    for dtype, (cpu, wall) in best.items():
        record[f"{dtype}_tok_per_cpu_s"] = round(args.tokens / cpu)
        record[f"{dtype}_tok_per_s"] = round(args.tokens / wall)
    first, second = dtypes[0], dtypes[1]
    record[f"{first}/{second}_cpu"] = round(best[second][0] / best[first][0], 3)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
