"""Where a 512-token prefill's time goes (ad hoc, session 49): JAX's profiler over one prefill of the
named 3.5-bit model with its recovery adapter, operations summed by kind, the kernels by output
shape and XLA's dot fusions by what they compute.

    DUMP=/tmp/xd AFMKIT_NO_XLA_CACHE=1 XLA_FLAGS="--xla_dump_to=/tmp/xd --xla_dump_hlo_as_text" \\
        PYTHONPATH=src python benchmarks/results/amx-prefill/prefill_prof.py > profile_TREE.txt
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import afmkit
from afmkit import runtime
from afmkit.infer.engine import Engine

runtime.return_freed_memory()
model = afmkit.load("smollm2-135m-instruct-3.5bpw")
engine = Engine(model.config, model.params, model.tokenizer, eos_ids=())
prompt = [int(t) for t in np.random.default_rng(0).integers(100, 30000, 512)]
sampling = afmkit.SamplingParams(max_new_tokens=1)


def run() -> float:
    start = time.perf_counter()
    list(engine.stream([prompt], sampling, adapters=model.adapter))
    return time.perf_counter() - start


run(), run()
walls = [run() for _ in range(3)]
print("prefill tok/s", round(512 / min(walls), 1), [round(w, 3) for w in walls])
trace = tempfile.mkdtemp()
jax.profiler.start_trace(trace)
profiled = run()
jax.profiler.stop_trace()
with gzip.open(glob.glob(f"{trace}/**/*.trace.json.gz", recursive=True)[0]) as f:
    events = json.load(f)
events = [e for e in (events["traceEvents"] if isinstance(events, dict) else events) if e.get("ph") == "X"]
events = [e for e in events if "hlo_op" in (e.get("args") or {})]
print("profiled wall ms", round(profiled * 1000, 1))
by_kind = collections.Counter()
for e in events:
    by_kind[(e["args"]["hlo_module"][:30], re.sub(r"\.\d+$", "", e["args"]["hlo_op"]))] += e["dur"] / 1000
for key, ms in by_kind.most_common(12):
    print(f"{ms:8.1f} ms  {key}")

dump = os.environ["DUMP"]
custom = re.compile(r'^\s*(?:ROOT )?%?(\S+) = (\w+\[[^\]]*\])\S* custom-call\(.*custom_call_target="([^"]+)"')
fusion = re.compile(r'^\s*(?:ROOT )?%?(ynn_fusion[.\d]*) = (\S+) fusion\(([^)]*)\).*op_name="([^"]+)"')
calls, dots = {}, {}
for name in glob.glob(f"{dump}/*prefill_chunk.cpu_after_optimizations.txt"):
    for line in Path(name).read_text().splitlines():
        if match := custom.match(line):
            calls[match.group(1)] = f"{match.group(3)} {match.group(2)}"
        if match := fusion.match(line):
            lora = " (LoRA)" if "lora" in match.group(3) else ""
            dots[match.group(1)] = f"{match.group(4).split('/')[-1]} {match.group(2).split('{')[0]}{lora}"
by_call = collections.Counter()
for e in events:
    if "prefill" in e["args"]["hlo_module"]:
        op = e["args"]["hlo_op"]
        by_call[calls.get(op) or dots.get(op) or "other"] += e["dur"] / 1000
print("by kernel and dot fusion:")
for key, ms in by_call.most_common(14):
    print(f"{ms:8.1f} ms  {key}")
