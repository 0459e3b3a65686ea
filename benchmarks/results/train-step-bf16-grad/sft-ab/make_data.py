"""Self-Instruct's seed tasks and user-oriented instructions (Apache-2.0) as chats."""
import json, os
root = os.environ["AFMKIT_SHARED_DATA"] + "/sft/"
with open("chats.jsonl", "w") as out:
    for name in ("self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented_instructions.jsonl"):
        for line in open(root + name):
            row = json.loads(line)
            for inst in row["instances"]:
                user = row["instruction"] + (("\n\n" + inst["input"]) if inst["input"] else "")
                out.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": inst["output"]}]}) + "\n")
