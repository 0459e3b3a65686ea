"""Profile one LoRA SFT step (value_and_grad, rank 16, batch 4 x 256) on the int4 base and print
the XLA operations' time, grouped by fused operation and, for dots, by output shape, dimension
numbers and operand types: where the step's time goes. Run with PYTHONPATH pointing at the tree
to profile."""

import collections
import functools
import glob
import gzip
import json
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import afmkit
from afmkit.adapters.lora import LoraConfig
from afmkit.train.objectives import assistant_sft
from afmkit.train.step import Batch, StepConfig, _loss_sums
from afmkit.train.trainable import LoraWeights

B, T = 4, 256
model = afmkit.load("smollm2-135m-instruct", dtype="int4")
subset = LoraWeights(LoraConfig(rank=16, alpha=32.0, dtype="float32"))
weights = subset.init(model.config, jax.random.PRNGKey(0))
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 49152, (B, T)), jnp.int32)
ones = jnp.ones((B, T), jnp.int32)
positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
batch = Batch(tokens=tokens, targets=jnp.roll(tokens, -1, 1), positions=positions, segment_ids=ones, loss_mask=ones)
loss = functools.partial(
    _loss_sums, config=model.config, step_config=StepConfig(), subset=subset, objective=assistant_sft()
)
step = jax.jit(jax.value_and_grad(loss, has_aux=True))
jax.block_until_ready(step(weights, batch, model.params, None))
times = []
for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(step(weights, batch, model.params, None))
    times.append(time.perf_counter() - start)
print("step s", [round(t, 2) for t in times])
program = step.lower(weights, batch, model.params, None).compile().as_text()
computations = {m.group(1): m.group(2) for m in re.finditer(r"\n%(\S+) \([^)]*\) -> \S+ \{(.*?)\n\}", program, re.S)}
calls = dict(re.findall(r"%(\S+) = \S+ fusion\([^)]*\), kind=\w+, calls=%([^,\s]+)", program))
with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    jax.block_until_ready(step(weights, batch, model.params, None))
    jax.profiler.stop_trace()
    with gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]) as trace:
        events = json.load(trace)["traceEvents"]
totals, counts = collections.Counter(), collections.Counter()
for event in events:
    name = event.get("name", "")
    if event.get("ph") != "X" or name.startswith(("ThunkExecutor", "$", "Slinky", "Pjit", "while")):
        continue
    key = re.sub(r"\.\d+$", "", name)
    body = computations.get(calls.get(name, ""), "")
    dot = re.search(r"= (\S+) dot\((.*?)\), (lhs_contracting_dims=\{[\d,]*\}, rhs_contracting_dims=\{[\d,]*\})", body)
    if dot:
        operands = sorted(set(re.findall(r"(\w+)\[[\d,]*\]\{[\d,]*\} parameter", body)))
        key = f"{key} dot -> {dot.group(1).split('{')[0]} {dot.group(3)} operands {'/'.join(operands)}"
    totals[key] += event["dur"]
    counts[key] += 1
print(f"profiled operations: {sum(totals.values()) / 1e3:.0f} ms")
for key, micros in totals.most_common(int(sys.argv[1]) if len(sys.argv) > 1 else 12):
    print(f"{micros / 1e3:8.1f} ms {counts[key]:5d}  {key}")
