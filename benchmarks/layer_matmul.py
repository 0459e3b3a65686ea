"""What the matmul benchmarks (``packed_matmul.py``, ``palettized_matmul.py``) share: one SmolLM2
layer's matrix shapes and the timing that compares paths fairly on a shared machine."""

from __future__ import annotations

import time
from typing import Any

import jax

# SmolLM2-135M: d = 576, 9 query heads and 3 KV heads of 64, FFN 1536; [inputs, outputs]
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def best_cpu_seconds(calls: dict[str, tuple[Any, tuple]], repeats: int) -> dict[str, float]:
    """Each path's best of ``repeats`` calls (``calls``: path -> (function, arguments)), in CPU
    seconds of this process, after one call to compile. The paths are called in turn, rotating
    which goes first, so a change of load between paths shows up in all of them."""
    paths = list(calls)
    best = dict.fromkeys(paths, float("inf"))
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile
    for i in range(repeats):
        for path in paths[i % len(paths) :] + paths[: i % len(paths)]:
            fn, args = calls[path]
            start = time.process_time()
            jax.block_until_ready(fn(*args))
            best[path] = min(best[path], time.process_time() - start)
    return best
