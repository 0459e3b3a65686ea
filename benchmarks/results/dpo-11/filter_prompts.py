"""The train prompts of a synth-if file whose question is in no dev set: longform-dev's 190
questions and dpo-4's dev200 are dev splits of other seeds and frames, whose split differs.

    python filter_prompts.py prompts_s11.jsonl ../longform-dev/longform_dev.jsonl ../dpo-4/dev200.jsonl > prompts.jsonl
"""

import json
import sys
from pathlib import Path

rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]
held = {json.loads(line)["task_source"] for path in sys.argv[2:] for line in Path(path).read_text().splitlines()}
kept = [row for row in rows if row["split"] == "train" and row["task_source"] not in held]
for row in kept:
    print(json.dumps(row, ensure_ascii=False))
print(f"{len(kept)} of {sum(r['split'] == 'train' for r in rows)} train prompts kept", file=sys.stderr)
