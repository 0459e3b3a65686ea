"""Greedy answers to the 64 dev64 prompts through the kernel path and XLA's path: how many differ."""

import json
import sys
from pathlib import Path

import afmkit
from afmkit.adapters import lora
from afmkit.infer import engine as engine_module

model = afmkit.load(sys.argv[1])
PROMPTS = Path(__file__).parents[1] / "edit-data-1" / "dev64-prompts.jsonl"
prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
texts = [p.get("prompt") or p["messages"][-1]["content"] for p in prompts]
ids = [model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": t}])) for t in texts]
sampling = afmkit.SamplingParams(max_new_tokens=int(sys.argv[2]))
KERNEL = (lora._Update.low_rank, engine_module.kernel_adds_low_rank)
XLA = (lambda self: None, lambda weight: False)
out = {}
for name, path in (("kernel", KERNEL), ("xla", XLA)):
    lora._Update.low_rank, engine_module.kernel_adds_low_rank = path
    out[name] = [r.tokens for r in model.engine.generate(ids, sampling, adapters=model.adapter)]
same = sum(a == b for a, b in zip(out["kernel"], out["xla"]))
first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(out["kernel"], out["xla"])]
print(
    json.dumps(
        {
            "model": sys.argv[1],
            "max_new_tokens": int(sys.argv[2]),
            "identical": same,
            "of": len(ids),
            "first_differing_token": [f for f in first if f is not None],
        }
    )
)
