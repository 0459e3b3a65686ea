"""dpo-12's data: dpo-11's 297 pairs, plus 210 replay chats (dpo-10's own greedy answers that finished
without a loop and followed every constraint, to prompts with no pair; seed 12), and the anchor text:
tiny Shakespeare from character 400,000 interleaved with hh-rlhf helpful-base test dialogues."""

import json
import os
import random
from pathlib import Path


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


rows = read_jsonl("../dpo11/loopcut.jsonl")
pairs = read_jsonl("../dpo11/pairs.jsonl")
paired = {p["prompt_id"] for p in pairs}
good = [r for r in rows if r.get("kind") == "finished" and r["reward"] == 1.0 and r["prompt_id"] not in paired]
replay = random.Random(12).sample(good, 210)
Path("data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs + replay))
print(f"{len(pairs)} pairs, {len(replay)} replay chats of {len(good)} eligible")

shared = os.environ["AFMKIT_SHARED_DATA"]
shakespeare = Path(f"{shared}/pretrain/tinyshakespeare_input.txt").read_text()[400000:]
dialogues = [r["chosen"].strip() for r in read_jsonl(f"{shared}/preference/hh-rlhf_helpful-base_test.jsonl")]
out, i, j = [], 0, 0
while i < len(shakespeare) or j < len(dialogues):
    if i < len(shakespeare):
        out.append(shakespeare[i : i + 4000])
        i += 4000
    block = []
    while j < len(dialogues) and sum(map(len, block)) < 4000:
        block.append(dialogues[j])
        j += 1
    if block:
        out.append("\n\n".join(block))
Path("anchor.txt").write_text("\n\n".join(out))
print(
    f"anchor: {sum(map(len, out))} characters, {len(shakespeare)} of Shakespeare, {sum(map(len, dialogues))} of dialogue"
)
