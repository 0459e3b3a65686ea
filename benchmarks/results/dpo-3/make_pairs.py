"""DPO pairs for dpo-3 (continuing dpo-2): round 3's loops from loop-cut-1 (the answer cut where its
loop begins, preferred to the whole loop: what `loop-cut` now writes as 'rejected'), plus 150
of dpo-2's pairs replayed."""

import gzip
import json
import random
import sys


def read_gzip_jsonl(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


loops = read_gzip_jsonl(sys.argv[1])
whole = {r["prompt_id"]: r["messages"][-1]["content"] for r in loops if r["kind"] == "loop"}
pairs = [{**r, "rejected": whole[r["prompt_id"]]} for r in loops if r["kind"] == "cut" and r["prompt_id"] in whole]
replay = read_gzip_jsonl(sys.argv[2])
rng = random.Random(0)
out = pairs + rng.sample(replay, 150)
rng.shuffle(out)
for row in out:
    print(json.dumps(row))
print(json.dumps({"loop_pairs": len(pairs), "replayed": 150}), file=sys.stderr)
