"""A/B in one process, interleaved (session 47): a shared adapter added inside the weight kernels
against XLA's separate LoRA products from a copy converted once (the path before). Prefill of one
512-token prompt, one-stream decode (64 tokens) and batch-16 decode (32 tokens), for a named model.

    python ab.py smollm2-135m-instruct-3.5bpw 3 >> results.jsonl
"""

import json
import statistics
import sys
import time

import afmkit
from afmkit.adapters import lora
from afmkit.infer import engine as engine_module
from afmkit.infer.engine import Engine

model = afmkit.load(sys.argv[1])
engine = Engine(model.config, model.params, model.tokenizer, eos_ids=())
ids = model.tokenizer.encode("The lighthouse keeper wrote in the logbook every evening, about the sea. " * 60)
prefill, short = ids[:512], ids[:32]
batch = [ids[i * 7 : i * 7 + 20 + 2 * i] for i in range(16)]
KERNEL = (lora._Update.low_rank, engine_module.kernel_adds_low_rank)
XLA = (lambda self: None, lambda weight: False)  # no shared update for the kernels; factors converted once


def use(path: tuple) -> None:
    # every stream makes a new batch, which prepares its step adapters again for this path
    lora._Update.low_rank, engine_module.kernel_adds_low_rank = path


def stamps(prompts: list[list[int]], new_tokens: int) -> list[float]:
    sampling = afmkit.SamplingParams(max_new_tokens=new_tokens)
    return [time.perf_counter()] + [
        time.perf_counter() for _ in engine.stream(prompts, sampling, adapters=model.adapter)
    ]


def measure() -> list[float]:
    first = stamps([prefill], 1)
    one = stamps([short], 65)
    many = stamps(batch, 33)
    # per-token stamps: the 16 rows' first tokens come first, then 32 steps of 16
    return [512 / (first[1] - first[0]), 64 / (one[-1] - one[1]), 16 * 32 / (many[-1] - many[16])]


results = {"kernel": [], "xla": []}
for path in (KERNEL, XLA):
    use(path)
    measure()  # compiles
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    for name, path in (("xla", XLA), ("kernel", KERNEL)):
        use(path)
        results[name].append([round(v, 1) for v in measure()])
medians = {name: [statistics.median(run[i] for run in runs) for i in range(3)] for name, runs in results.items()}
print(json.dumps({"model": sys.argv[1], "prefill, decode, batch16 tok/s": results, "medians": medians}))
