"""How many step programs a run of requests compiles, and how long each call takes (compiles
included), when one engine serves the base, one shared adapter, mixed adapters, and an adapter of
another rank (session 47; `python compiles.py > results.jsonl`)."""

import json
import time

import jax

import afmkit
from afmkit.adapters.lora import LoraConfig, random_adapter
from afmkit.infer import engine as E

model = afmkit.load("smollm2-135m-instruct")  # int4 on this CPU
eng = model.engine
ids = model.tokenizer.encode("Tell me about the sea.")
sampling = afmkit.SamplingParams(max_new_tokens=8)
a16 = random_adapter(model.config, LoraConfig(rank=16), jax.random.PRNGKey(1), b_std=0.01, name="a16")
b16 = random_adapter(model.config, LoraConfig(rank=16), jax.random.PRNGKey(2), b_std=0.01, name="b16")
c8 = random_adapter(model.config, LoraConfig(rank=8), jax.random.PRNGKey(3), b_std=0.01, name="c8")


JITTED = [f for f in vars(E).values() if hasattr(f, "_cache_size")]


def programs():
    return sum(f._cache_size() for f in JITTED)


steps = [  # two requests each time, so the batch shape stays
    ("base, base", [None, None]),
    ("a16, a16 (one shared adapter)", [a16, a16]),
    ("a16, a16 again", [a16, a16]),
    ("b16, b16 (another, same shape)", [b16, b16]),
    ("a16, b16 (mixed: the bank)", [a16, b16]),
    ("a16, base (mixed)", [a16, None]),
    ("c8, c8 (shared, rank 8)", [c8, c8]),
    ("c8, a16 (mixed, the bank grown to hold both)", [c8, a16]),
    ("a16, a16 after all that", [a16, a16]),
]
rows = []
for name, adapters in steps:
    before = programs()
    start = time.perf_counter()
    eng.generate([ids] * len(adapters), sampling, adapters=adapters)
    rows.append(
        {"requests": name, "new programs": programs() - before, "seconds": round(time.perf_counter() - start, 2)}
    )
    print(json.dumps(rows[-1]), flush=True)
