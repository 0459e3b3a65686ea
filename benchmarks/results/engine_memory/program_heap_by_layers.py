"""Heap held by the engine's compiled programs against the number of layers compiled into them.

The model (default: the named 3.5-bit build, its recovery adapter left out) truncated to its first
n layers; for each n, one 512-token prefill with one sampled token through ``Engine.stream``
(``generation.py``'s prompt), which compiles the prefill, empty-cache and decode programs; then
the heap (glibc's ``mallinfo2``: in use, including mmapped blocks) that clearing those programs'
jit caches frees, and what ``jax.clear_caches()`` frees after it. Compiled afresh
(``AFMKIT_NO_XLA_CACHE=1``). Heap bytes do not depend on the machine's load.

    AFMKIT_NO_XLA_CACHE=1 python benchmarks/results/engine_memory/program_heap_by_layers.py \
        --json benchmarks/results/engine_memory/program_heap_by_layers.json
"""

import argparse
import dataclasses
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/: engine_memory, generation
from afmkit import runtime
from engine_memory import _LIBC, _mib
from generation import build_workload, gguf_path


def heap_mib() -> float:
    gc.collect()
    info = _LIBC.mallinfo2()
    return _mib(info.uordblks + info.hblkhd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct-3.5bpw")
    parser.add_argument("--json")
    args = parser.parse_args()
    runtime.return_freed_memory()  # as afmkit's commands
    import jax

    import afmkit
    import afmkit.infer.engine as engine_module
    from afmkit.infer.engine import Engine
    from afmkit.kernels import cpu_name

    model = afmkit.load(args.model, dtype="float32")
    prompt = build_workload(gguf_path())["prefill"]
    rows = []
    for n in (1, 2, 4, 8, 15, 30):
        params = {**model.params, "layers": model.params["layers"][:n]}
        engine = Engine(dataclasses.replace(model.config, n_layers=n), params, model.tokenizer, eos_ids=())
        before = heap_mib()
        for _ in engine.stream([prompt], afmkit.SamplingParams(max_new_tokens=1)):
            pass
        after_call = heap_mib()
        for name in ("_prefill_chunk", "_decode_step", "_empty_cache"):
            getattr(engine_module, name).clear_cache()
        after_programs = heap_mib()
        jax.clear_caches()
        rows.append(
            {
                "layers": n,
                "heap_added_by_the_call_mib": round(after_call - before, 1),
                "freed_by_clearing_the_engine_programs_mib": round(after_call - after_programs, 1),
                "freed_by_jax_clear_caches_after_mib": round(after_programs - heap_mib(), 1),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"model": args.model, "cpu": cpu_name(), "jax": jax.__version__, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
