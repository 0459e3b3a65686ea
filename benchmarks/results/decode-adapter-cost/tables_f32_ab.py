"""The named 3.5-bit model's decode with its palettized tables and scales in fp16 (as stored, each
call converting them) against fp32 copies made once: ms per token, and whether the tokens agree.

    python tables_f32_ab.py build    # the build alone
    python tables_f32_ab.py rec      # with its recovery adapter
"""

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import afmkit
from afmkit.infer.engine import Engine
from afmkit.model.palettized import PalettizedWeight

model = afmkit.load("smollm2-135m-instruct-3.5bpw", recovery=sys.argv[1] == "rec")


def fp32_tables(params):
    def convert(leaf):
        if not isinstance(leaf, PalettizedWeight):
            return leaf
        scales = None if leaf.scales is None else leaf.scales.astype(jnp.float32)
        return dataclasses.replace(leaf, tables=leaf.tables.astype(jnp.float32), scales=scales)

    return jax.tree_util.tree_map(convert, params, is_leaf=lambda leaf: isinstance(leaf, PalettizedWeight))


engines = {
    "f16": Engine(model.config, model.params, model.tokenizer, eos_ids=()),
    "f32": Engine(model.config, fp32_tables(model.params), model.tokenizer, eos_ids=()),
}
chat = [{"role": "user", "content": "Write a short story about a dragon who learns to bake bread."}]
prompt = [model.tokenizer.encode(model.tokenizer.apply_chat_template(chat))]
sampling = afmkit.SamplingParams(max_new_tokens=128)


def run(engine):
    tokens, stamps = [], []
    for event in engine.stream(prompt, sampling, adapters=model.adapter):
        stamps.append(time.perf_counter())
        tokens.append(event)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), tokens


for engine in engines.values():
    run(engine)  # compiles
times, outputs = {name: [] for name in engines}, {}
for round_ in range(5):
    order = list(engines.items()) if round_ % 2 == 0 else list(reversed(engines.items()))
    for name, engine in order:
        seconds, outputs[name] = run(engine)
        times[name].append(seconds * 1000)
print({name: (round(float(np.median(ms)), 3), [round(m, 2) for m in ms]) for name, ms in times.items()})
print("same tokens:", [str(outputs["f16"]) == str(outputs["f32"])])
