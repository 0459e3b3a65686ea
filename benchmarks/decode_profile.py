"""Where a single-stream decode step's time goes: the compiled step's operations, timed by JAX's
profiler, grouped into layer matmuls, the output projection (logits), the attention kernel, the
other XLA operations, and what is left of the step's wall time (host work: dispatch, sampling,
reading the token back).

    python benchmarks/decode_profile.py                                  # int4 and the 3.5-bit model
    python benchmarks/decode_profile.py --out benchmarks/results/decode_profile.json

Each engine runs in its own process, without afmkit's persistent compilation cache (so XLA
compiles the step and dumps its optimized HLO, which names each custom call's kernel and output
shape). One stream of ``--tokens`` greedy tokens after a short prompt: a warm-up run compiles, a
timed run gives the wall time per token, then a third run is profiled. Operation times are summed
over the profiled run's decode steps and divided by their number: milliseconds per token, summed
over threads (XLA may run two operations at once), so the groups can add up to more than the wall
time and ``host_ms_per_token`` (the profiled wall time less the operations) is host work only when
nothing overlapped: negative values mean overlap. The profiler's own cost inflates the profiled run,
so read the split, not the absolute times, and compare engines within one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENGINES = {  # name: (model, dtype, recovery)
    "afmkit-int4": ("smollm2-135m-instruct", "int4", True),
    # The post-trained model as users run it: int4 and its shipped adapter (LoRA, unmerged).
    "afmkit-afm": ("smollm2-135m-afm", None, True),
    # The named model as users run it: the build and its recovery adapter (LoRA, unmerged).
    "afmkit-3.5bpw": ("smollm2-135m-instruct-3.5bpw", None, True),
    "afmkit-3.5bpw-build": ("smollm2-135m-instruct-3.5bpw", None, False),
}
PROMPT = "Write a short story about a dragon who learns to bake bread."
STEP_MODULE = "jit__decode_step"
CUSTOM_CALL = re.compile(r'^\s*(?:ROOT )?(\S+) = (\w+\[[^\]]*\])\S* custom-call\(.*custom_call_target="([^"]+)"')


def custom_calls(dump_dir: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (kernel, output shape) of the decode step's custom calls."""
    files = glob.glob(f"{dump_dir}/*{STEP_MODULE}*after_optimizations.txt")
    if len(files) != 1:
        raise SystemExit(f"expected one optimized {STEP_MODULE} module in {dump_dir}, found {len(files)}")
    calls = {}
    for line in Path(files[0]).read_text().splitlines():
        match = CUSTOM_CALL.match(line)
        if match:
            calls[match.group(1).lstrip("%")] = (match.group(3), match.group(2))
    return calls


def group(op: str, calls: dict[str, tuple[str, str]], vocab: int) -> str:
    kernel, shape = calls.get(op, (None, ""))
    if kernel in ("afmkit_packed_matmul", "afmkit_palettized_matmul", "afmkit_palettized_matmul_int8"):
        return "output projection" if shape.endswith(f",{vocab}]") else "layer matmuls"
    if kernel is not None and "attention" in kernel:
        return "attention kernel"
    return "other XLA operations"


def worker(name: str, tokens: int) -> dict[str, Any]:
    import jax

    import afmkit
    from afmkit import kernels, runtime
    from afmkit.infer.engine import Engine

    runtime.return_freed_memory()
    source, dtype, recovery = ENGINES[name]
    model = afmkit.load(source, dtype=dtype, recovery=recovery)
    engine = Engine(model.config, model.params, model.tokenizer, eos_ids=())
    prompt = [model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))]
    sampling = afmkit.SamplingParams(max_new_tokens=tokens)

    def run() -> float:
        stamps = [time.perf_counter() for _ in engine.stream(prompt, sampling, adapters=model.adapter)]
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # seconds per token after the first

    run()  # compiles
    wall = run()
    trace_dir = tempfile.mkdtemp(prefix="afmkit-trace-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    profiled_wall = run()
    jax.profiler.stop_trace()
    with gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]) as trace:
        events = json.load(trace)
    events = events["traceEvents"] if isinstance(events, dict) else events
    calls = custom_calls(os.environ["AFMKIT_PROFILE_DUMP"])
    ms, by_op = collections.Counter(), collections.Counter()
    runs = set()  # one XLA run of the step per decoded token
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") != "X" or args.get("hlo_module") != STEP_MODULE:
            continue
        if event["name"] == STEP_MODULE or "hlo_op" not in args:
            continue
        ms[group(args["hlo_op"], calls, model.config.vocab_size)] += event["dur"] / 1000
        by_op[re.sub(r"\.\d+$", "", args["hlo_op"])] += event["dur"] / 1000  # ffi_call.481 -> ffi_call
        runs.add(args.get("run_id"))
    steps = len(runs)
    per_token = {k: round(v / max(steps, 1), 3) for k, v in sorted(ms.items())}
    ops = sum(per_token.values())
    return {
        "engine": name,
        "model": source,
        "adapter": None if model.adapter is None else model.adapter.name,
        "dtype": repr(model).split(", ")[-1][:-1],
        "kernels": kernels.describe(),
        "tokens": tokens,
        "wall_ms_per_token": round(wall * 1000, 3),
        "tok_s": round(1 / wall, 1),
        "profiled_wall_ms_per_token": round(profiled_wall * 1000, 3),
        "profiled_steps": steps,
        "op_ms_per_token": per_token,
        "op_ms_per_token_total": round(ops, 3),
        "host_ms_per_token": round(profiled_wall * 1000 - ops, 3),
        "top_ops_ms_per_token": {k: round(v / max(steps, 1), 3) for k, v in by_op.most_common(12)},
        "custom_calls": collections.Counter(f"{k} {s}" for k, s in calls.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", help="write the records as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens)))
        return
    records = []
    for name in args.engines.split(","):
        dump = tempfile.mkdtemp(prefix="afmkit-hlo-")
        env = dict(
            os.environ,
            AFMKIT_NO_XLA_CACHE="1",
            AFMKIT_PROFILE_DUMP=dump,
            XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text "
            f"--xla_dump_hlo_module_re=.*decode_step.*",
        )
        argv = [sys.executable, __file__, "--worker", name, "--tokens", str(args.tokens)]
        out = subprocess.run(argv, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        record = json.loads(out.stdout.strip().splitlines()[-1])
        records.append(record)
        print(
            f"{name}: {record['tok_s']} tok/s ({record['wall_ms_per_token']} ms/token); profiled "
            f"{record['profiled_wall_ms_per_token']} ms/token: "
            + ", ".join(f"{k} {v}" for k, v in record["op_ms_per_token"].items())
            + f", host {record['host_ms_per_token']}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "decode_profile", "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
