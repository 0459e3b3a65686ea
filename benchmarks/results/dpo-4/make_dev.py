"""dev200: a selection split of 200 synth-if dev prompts (one per dev task) whose instruction families
and constraints per prompt follow IFEval's proportions (its published instruction-type mix, not its
prompts), answered at IFEval's 1,024-token limit. dev64 (512 tokens, uniform families) twice picked
adapters whose IFEval then fell, because it under-weights length constraints and over-rewards short
answers. Usage: make_dev.py prompts_20k.jsonl ifeval_input_data.jsonl > dev200.jsonl"""

import collections
import json
import random
import sys
from pathlib import Path

N = 200
rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]
ifeval = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines()]
target = collections.Counter(i for r in ifeval for i in r["instruction_id_list"])
target = {f: c * N / len(ifeval) for f, c in target.items()}
per_prompt = collections.Counter(min(len(r["instruction_id_list"]), 3) for r in ifeval)
per_prompt = {k: v * N / len(ifeval) for k, v in per_prompt.items()}

dev = [r for r in rows if r["split"] == "dev"]
random.Random(0).shuffle(dev)
have, sizes, tasks, chosen = collections.Counter(), collections.Counter(), set(), []
while len(chosen) < N:

    def gain(r):
        ids = r["instruction_id_list"]
        if r["task_source"] in tasks or sizes[len(ids)] >= per_prompt.get(len(ids), 0) + 1:
            return float("-inf")
        return sum(target.get(i, 0) - have[i] for i in ids) / len(ids)

    best = max(dev, key=gain)
    if gain(best) == float("-inf"):
        break
    chosen.append(best)
    tasks.add(best["task_source"])
    sizes[len(best["instruction_id_list"])] += 1
    have.update(best["instruction_id_list"])
for r in chosen:
    print(json.dumps(r))
print(
    json.dumps(
        {
            "prompts": len(chosen),
            "sizes": dict(sizes),
            "families": {f: [have[f], round(t, 1)] for f, t in sorted(target.items())},
        }
    ),
    file=sys.stderr,
)
