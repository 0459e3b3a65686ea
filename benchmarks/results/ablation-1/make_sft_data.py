"""The SFT arm's data: Self-Instruct's human demonstrations (seed + user-oriented tasks, Apache-2.0),
one instance each, less every task the synth-if dev split asks (the dev prompts are built on them)."""

import json
import os
import sys
from pathlib import Path

prompts, out = sys.argv[1], sys.argv[2]
data = os.path.join(os.environ.get("AFMKIT_SHARED_DATA", "../shared/data"), "sft")
lines = Path(prompts).read_text(encoding="utf-8").splitlines()
dev_tasks = {json.loads(line)["task"].strip() for line in lines if '"split": "dev"' in line}
kept, dropped = [], 0
for name in ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented_instructions.jsonl"):
    for line in Path(data, name).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        instance = row["instances"][0]
        user = row["instruction"] + ("\n\n" + instance["input"] if instance["input"] else "")
        if any(row["instruction"].strip() in task or task in user for task in dev_tasks):
            dropped += 1
            continue
        kept.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": instance["output"]}]}
        )
with open(out, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in kept)
print(f"{len(kept)} chats kept, {dropped} dropped (their task is a dev task)")
