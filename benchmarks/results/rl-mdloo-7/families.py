"""Per constraint of the prompt: how often MDLOO's sampled answers ran to the token limit, looped,
and their mean strict reward, over the run folders' `rl/samples/`.

    python families.py PROMPTS.jsonl RUN_DIR [RUN_DIR...]
"""

import collections
import json
import sys
from pathlib import Path

asked = {}
for line in Path(sys.argv[1]).read_text().splitlines():
    row = json.loads(line)
    asked[row["id"]] = row["instruction_id_list"]
counts = collections.defaultdict(lambda: [0, 0.0, 0, 0])
for run in sys.argv[2:]:
    for path in sorted(Path(run, "rl", "samples").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            for family in {"(all)", *asked[sample["prompt_id"]]}:
                c = counts[family]
                c[0] += 1
                c[1] += sample["rewards"]["strict"]
                c[2] += sample["finish_reason"] == "length"
                c[3] += sample["loop"]
print(f"{'constraint':46s} {'samples':>7s} {'reward':>7s} {'at limit':>8s} {'loops':>6s}")
for family, (n, reward, limit, loops) in sorted(counts.items(), key=lambda kv: -kv[1][2] / kv[1][0]):
    print(f"{family:46s} {n:7d} {reward / n:7.3f} {limit / n:8.1%} {loops / n:6.1%}")
