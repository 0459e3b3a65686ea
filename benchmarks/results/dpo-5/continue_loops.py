"""Loop pairs whose preferred answer is long and loop-free (for dpo-5).

dpo-3's loop pairs preferred an answer *cut* where its loop begins and taught "stop early". Here
the preferred answer keeps the cut answer and goes on: dpo-4 continues it (sampled, temperature
0.7, top-p 0.95, presence 0.6 / frequency 0.3 on the new tokens, up to 320 tokens, 4 tries) and
a continuation is kept only if it ends by itself, adds at least 15 words, repeats no sentence of
the answer, leaves no loop, and the whole answer scores at least the cut's strict verifier
reward. The rejected answer is dpo-4's own greedy loop, so each pair differs from the point
where the model would repeat itself.

Usage: continue_loops.py ADAPTER prompts_20k.jsonl loopcut.jsonl > loop_pairs.jsonl
(loopcut.jsonl: ``afmkit posttrain loop-cut --adapter ADAPTER``'s output; its "cut" chats carry
the whole looped answer as "rejected")."""

import json
import re
import sys
from pathlib import Path

import afmkit
from afmkit.infer.sampling import SamplingParams
from afmkit.posttrain.trunk import load_init_adapter
from afmkit.posttrain.verifiable import instruction_rewards, is_loop

TRIES, MIN_NEW_WORDS = 4, 15
SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def repeats_a_sentence(text):
    seen = set()
    for m in SENTENCE.finditer(text):
        s = " ".join(m.group().lower().split())
        if len(s) >= 24:
            if s in seen:
                return True
            seen.add(s)
    return False


model = afmkit.load()
adapter = load_init_adapter(model, sys.argv[1], flag="adapter")
prompts = {row["id"]: row for row in read_jsonl(sys.argv[2])}
cuts = [r for r in read_jsonl(sys.argv[3]) if r["kind"] == "cut" and "rejected" in r]
texts, owners = [], []
for i, chat in enumerate(cuts):
    head = model.tokenizer.apply_chat_template(chat["messages"][:-1]) + chat["messages"][-1]["content"]
    for seed in range(TRIES):
        texts.append(head)
        owners.append((i, seed))
params = [
    SamplingParams(
        max_new_tokens=320, temperature=0.7, top_p=0.95, seed=seed, presence_penalty=0.6, frequency_penalty=0.3
    )
    for _, seed in owners
]
completions = model.engine.generate([model.tokenizer.encode(t) for t in texts], params, adapters=adapter)
best = {}
counts = {"cuts": len(cuts), "tries": len(texts), "not_ended": 0, "short": 0, "repeats": 0, "worse": 0, "kept": 0}
for (i, _), done in zip(owners, completions):
    chat = cuts[i]
    cut = chat["messages"][-1]["content"]
    new = done.text.strip()
    whole = f"{cut}\n{new}" if new.startswith(("-", "*")) else f"{cut} {new}"  # a list item starts a line
    if done.finish_reason != "stop":
        counts["not_ended"] += 1
        continue
    if len(new.split()) < MIN_NEW_WORDS:
        counts["short"] += 1
        continue
    if repeats_a_sentence(whole) or is_loop(whole):
        counts["repeats"] += 1
        continue
    row = prompts[chat["prompt_id"]]
    reward_cut, reward_whole = instruction_rewards([row, row], [cut, whole]).strict
    if reward_whole < reward_cut:
        counts["worse"] += 1
        continue
    score = (reward_whole, len(whole.split()))
    if i not in best or score > best[i][0]:
        best[i] = (score, whole)
for i, (_, whole) in sorted(best.items()):
    chat = cuts[i]
    counts["kept"] += 1
    out = {**chat, "messages": [*chat["messages"][:-1], {"role": "assistant", "content": whole}], "loop_pair": True}
    print(json.dumps(out))
print(json.dumps(counts), file=sys.stderr)
