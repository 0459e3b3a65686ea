"""Replay chats for ``posttrain dpo --replay-weight``: the starting adapter's own answers to the
replay prompts (``afmkit eval ifeval --input replay_prompts.jsonl --out DIR``), lines without
``rejected``. An answer is kept if it ends by itself, does not loop, has at least 15 words
(unless the prompt asks for one of fixed options) and is not all lowercase or all capitals
unasked; dpo-2 wraps many answers in quotation marks nobody asked for (the leak dpo-4's quoted
pairs cut), so a wrapping pair of quotes is removed first where the prompt asks no quotation.
Last, the answer (as kept) must follow every instruction of its prompt (strict).

Usage: make_replay.py REPLAY_PROMPTS EVAL_DIR > replay.jsonl"""

import json
import sys
from collections import Counter
from pathlib import Path

from afmkit.posttrain.verifiable import instruction_rewards, is_loop

MIN_WORDS = 15


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


prompts = {row["key"]: row for row in read_jsonl(sys.argv[1])}
answers = read_jsonl(Path(sys.argv[2]) / "responses.jsonl")
counts, kept = Counter(answers=len(answers)), []
for answer in answers:
    row, text = prompts[answer["key"]], answer["response"].strip()
    asked = row["instruction_id_list"]
    if "startend:quotation" not in asked and len(text) > 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
        counts["unquoted"] += 1
    letters = sum(c.isalpha() for c in text) >= 20
    no_case = not any(i.startswith(("change_case", "language")) for i in asked)
    if answer["finish_reason"] != "stop":
        counts["at_limit"] += 1
    elif is_loop(text):
        counts["loop"] += 1
    elif len(text.split()) < MIN_WORDS and "detectable_format:constrained_response" not in asked:
        counts["short"] += 1
    elif text.startswith('"') and "startend:quotation" not in asked:
        counts["unasked_quote"] += 1
    elif letters and no_case and text in (text.lower(), text.upper()):
        counts["unasked_case"] += 1
    else:
        kept.append((row, text))
strict = instruction_rewards([row for row, _ in kept], [text for _, text in kept]).strict if kept else []
for (row, text), reward in zip(kept, strict):
    if reward < 1:
        counts["not_followed"] += 1
        continue
    counts["kept"] += 1
    messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": text}]
    print(json.dumps({"prompt_id": row["key"], "messages": messages}))
print(json.dumps(counts), file=sys.stderr)
