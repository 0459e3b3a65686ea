"""Where the engine's memory goes: the model's share of peak RSS, phase by phase.

``benchmarks/generation.py`` reports each engine's peak RSS next to JAX's floor (an empty JAX
process); issue 13 asks that the difference stay under 150 MiB. This splits it. One process loads
the model, then runs ``generation.py``'s three workloads in turn (its prompts: a 512-token prefill,
one 32-token prompt and 16 prompts of 20-60 tokens, each generating 128 tokens) through
``Engine.stream``; after each it records RSS and peak RSS (``/proc``), the bytes of live JAX arrays (weights, caches), glibc's heap in use and held free
(``mallinfo2``), and the jitted engine programs compiled so far. At the end it empties the jit
caches one function at a time and records what each frees, then ``malloc_trim`` (what the heap
held free). Linux with glibc only.

    python benchmarks/engine_memory.py --model smollm2-135m-instruct-3.5bpw --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import sys

from generation import build_workload, gguf_path, peak_rss_mib, rss_mib  # this folder's benchmark

PROGRAMS = ("_prefill_chunk", "_decode_step", "_empty_cache", "_paged_prefill", "_prefill_slots_chunk")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def snapshot(engine_module: object) -> dict[str, object]:
    import jax

    info = _LIBC.mallinfo2()
    return {
        "rss_mib": round(rss_mib(), 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "live_arrays_mib": _mib(sum(a.nbytes for a in jax.live_arrays())),
        "heap_in_use_mib": _mib(info.uordblks + info.hblkhd),
        "heap_free_held_mib": _mib(info.fordblks),
        "programs": {name: getattr(engine_module, name)._cache_size() for name in PROGRAMS},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct-3.5bpw")
    parser.add_argument("--dtype", default="float32", help="as generation.py's afmkit engines")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from afmkit import runtime

    runtime.return_freed_memory()  # as afmkit's commands do (AFMKIT_MALLOC=default to compare glibc's defaults)
    import jax
    import jax.numpy as jnp

    jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()
    floor_peak = peak_rss_mib()  # this process as JAX's floor

    import afmkit
    import afmkit.infer.engine as engine_module
    from afmkit.infer.engine import Engine

    model = afmkit.load(args.model, dtype=args.dtype)
    engine = Engine(model.config, model.params, model.tokenizer, eos_ids=())
    workload = build_workload(gguf_path())

    def run(prompts: list[list[int]], new_tokens: int) -> None:
        sampling = afmkit.SamplingParams(max_new_tokens=new_tokens)
        for _ in engine.stream(prompts, sampling, adapters=model.adapter):  # its default adapter, as users run it
            pass

    phases = [{"phase": "loaded", **snapshot(engine_module)}]
    new_tokens = workload["new_tokens"]
    for phase, prompts, n in (
        ("prefill 512", [workload["prefill"]], 1),
        ("one row", [workload["short"]], new_tokens),
        ("16 rows", workload["batch"], new_tokens),
        ("16 rows again", workload["batch"], new_tokens),
    ):
        run(prompts, n)
        gc.collect()
        phases.append({"phase": phase, **snapshot(engine_module)})

    freed = {}
    for name in PROGRAMS:
        before = _LIBC.mallinfo2().uordblks
        getattr(engine_module, name).clear_cache()
        gc.collect()
        freed[name] = _mib(before - _LIBC.mallinfo2().uordblks)
    before = _LIBC.mallinfo2().uordblks
    jax.clear_caches()
    gc.collect()
    freed["other jax caches"] = _mib(before - _LIBC.mallinfo2().uordblks)
    rss_before_trim = snapshot(engine_module)["rss_mib"]
    _LIBC.malloc_trim(0)
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "floor_peak_rss_mib": round(floor_peak, 1),
        "phases": phases,
        "heap_freed_by_clearing_mib": freed,
        "rss_after_clearing_mib": rss_before_trim,
        "rss_after_malloc_trim_mib": snapshot(engine_module)["rss_mib"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
