"""dpo-12's data: dpo-11's 297 pairs, plus 210 replay chats (dpo-10's own greedy answers that finished
without a loop and followed every constraint, to prompts with no pair; seed 12), and the anchor text:
tiny Shakespeare from character 400,000 interleaved with hh-rlhf helpful-base test dialogues."""
import json, os, random

rows = [json.loads(l) for l in open("../dpo11/loopcut.jsonl")]
pairs = [json.loads(l) for l in open("../dpo11/pairs.jsonl")]
paired = {p["prompt_id"] for p in pairs}
good = [r for r in rows if r.get("kind") == "finished" and r["reward"] == 1.0 and r["prompt_id"] not in paired]
replay = random.Random(12).sample(good, 210)
with open("data.jsonl", "w") as f:
    for r in pairs + replay:
        f.write(json.dumps(r) + "\n")
print(f"{len(pairs)} pairs, {len(replay)} replay chats of {len(good)} eligible")

shared = os.environ["AFMKIT_SHARED_DATA"]
sh = open(f"{shared}/pretrain/tinyshakespeare_input.txt").read()[400000:]
hh = [json.loads(l)["chosen"].strip() for l in open(f"{shared}/preference/hh-rlhf_helpful-base_test.jsonl")]
out, i, j = [], 0, 0
while i < len(sh) or j < len(hh):
    if i < len(sh):
        out.append(sh[i:i + 4000]); i += 4000
    buf = []
    while j < len(hh) and sum(map(len, buf)) < 4000:
        buf.append(hh[j]); j += 1
    if buf:
        out.append("\n\n".join(buf))
open("anchor.txt", "w").write("\n\n".join(out))
print(f"anchor: {sum(map(len, out))} characters, {len(sh)} of Shakespeare, {sum(map(len, hh))} of dialogue")
