"""End to end for the row thresholds: decode tokens/s of B rows together (greedy, 64 new tokens
each, no EOS), int4 default and the named 3.5-bit model, in the tree on PYTHONPATH. One JSON line.

    PYTHONPATH=TREE/src python batch_ab.py TAG
"""

import json
import sys
import time

import afmkit
from afmkit import kernels
from afmkit.infer.engine import Engine

PROMPTS = [
    "Write a short story about a dragon who learns to bake bread.",
    "Explain how a bicycle stays upright.",
    "List five facts about the moon.",
    "What makes a good cup of tea?",
]
record = {"tree": sys.argv[1], "kernels": None, "decode_tok_s": {}}
for name, dtype in (("smollm2-135m-instruct", "int4"), ("smollm2-135m-instruct-3.5bpw", None)):
    model = afmkit.load(name, dtype=dtype)
    record["kernels"] = kernels.describe()
    engine = Engine(model.config, model.params, model.tokenizer, eos_ids=())
    template = model.tokenizer.apply_chat_template
    for rows in (3, 4, 8, 12):
        prompts = [model.tokenizer.encode(template([{"role": "user", "content": PROMPTS[i % 4]}])) for i in range(rows)]
        sampling = afmkit.SamplingParams(max_new_tokens=64)

        def run(engine=engine, prompts=prompts, sampling=sampling, adapter=model.adapter, rows=rows):
            stamps = [time.perf_counter() for _ in engine.stream(prompts, sampling, adapters=adapter)]
            # every row's first token comes from its prefill; the rest are decode steps of all rows
            return rows * 63 / (stamps[-1] - stamps[rows - 1])

        run()
        record["decode_tok_s"][f"{name} x{rows}"] = round(max(run() for _ in range(3)), 1)
print(json.dumps(record))
