"""Median decode step and best 512-token prefill in one process (ad hoc, session 49): the named 3.5-bit
model (recovery adapter applied), or with ``int4`` the int4 base model; run it from two trees in turn
to compare their kernels.

    PYTHONPATH=TREE/src python step.py TAG >> decode_step_ab.jsonl
    PYTHONPATH=TREE/src python step.py TAG int4 >> int4_ab.jsonl
"""

import json
import statistics
import sys
import time

import numpy as np

import afmkit
from afmkit import kernels, runtime
from afmkit.infer.engine import Engine

runtime.return_freed_memory()
if sys.argv[2:] == ["int4"]:
    model = afmkit.load("smollm2-135m-instruct", dtype="int4")
else:
    model = afmkit.load("smollm2-135m-instruct-3.5bpw")
engine = Engine(model.config, model.params, model.tokenizer, eos_ids=())
chat = [{"role": "user", "content": "Write a short story about a dragon."}]
prompt = [model.tokenizer.encode(model.tokenizer.apply_chat_template(chat))]
long_prompt = [[int(t) for t in np.random.default_rng(0).integers(100, 30000, 512)]]


def decode() -> float:
    sampling = afmkit.SamplingParams(max_new_tokens=200)
    stamps = [time.perf_counter() for _ in engine.stream(prompt, sampling, adapters=model.adapter)]
    return statistics.median(np.diff(stamps[1:]))


def prefill() -> float:
    start = time.perf_counter()
    list(engine.stream(long_prompt, afmkit.SamplingParams(max_new_tokens=1), adapters=model.adapter))
    return time.perf_counter() - start


decode(), prefill()  # compile
steps = [decode() for _ in range(3)]
prefills = [prefill() for _ in range(3)]
arithmetic = getattr(kernels, "bf16_arithmetic", lambda: "pairs")()  # main's trees lack it
record = {"tree": sys.argv[1], "arithmetic": arithmetic, "decode_ms": round(1000 * min(steps), 3)}
record["decode_ms_all"] = [round(1000 * s, 3) for s in steps]
record["prefill_tok_s"] = round(512 / min(prefills), 1)
print(json.dumps(record))
