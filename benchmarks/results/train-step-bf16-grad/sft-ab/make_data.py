"""Self-Instruct's seed tasks and user-oriented instructions (Apache-2.0) as chats."""

import json
import os
from pathlib import Path

root = Path(os.environ["AFMKIT_SHARED_DATA"]) / "sft"
with open("chats.jsonl", "w") as out:
    for name in ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented_instructions.jsonl"):
        for line in (root / name).read_text().splitlines():
            row = json.loads(line)
            for inst in row["instances"]:
                user = row["instruction"] + (("\n\n" + inst["input"]) if inst["input"] else "")
                chat = [{"role": "user", "content": user}, {"role": "assistant", "content": inst["output"]}]
                out.write(json.dumps({"messages": chat}) + "\n")
