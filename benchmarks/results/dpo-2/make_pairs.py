"""DPO pairs for run dpo-2 from edit-data's output (ed80.jsonl: the editor's rewrites of round 3's
answers trimmed to 80 words, with 'rejected' = the unedited answer where it followed fewer
constraints): the form families' own pairs, other families' pairs, and 'unasked form' pairs
(the preferred answer against itself in a form its prompt did not ask for: quoted, upper case,
lower case, or after a copy of the request), so that a form is preferred only when asked."""

import json
import random
import sys
from pathlib import Path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


prompts = {row["id"]: row for row in read_jsonl(sys.argv[1])}
chats = read_jsonl(sys.argv[2])
FORMS = {
    "startend:quotation": lambda c, row: f'"{c}"',
    "change_case:english_capital": lambda c, row: c.upper(),
    "change_case:english_lowercase": lambda c, row: c.lower(),
    "combination:repeat_prompt": lambda c, row: f"{row['task']}\n\n{c}",
}
rng = random.Random(0)
rng.shuffle(chats)
per_form, others, unasked = {f: 0 for f in FORMS}, 0, 0
out = []
for chat in chats:
    row = prompts[chat["prompt_id"]]
    families = set(row["instruction_id_list"])
    asked = families & set(FORMS)
    if asked and "rejected" in chat:
        if any(per_form[f] < 100 for f in asked):
            for f in asked:
                per_form[f] += 1
            out.append(chat)
        continue
    if asked:
        continue
    if "rejected" in chat and others < 150:
        others += 1
        out.append(chat)
        continue
    if unasked < 250 and not any(f.startswith("change_case") for f in families):
        chosen = chat["messages"][-1]["content"]
        form = rng.choice(sorted(FORMS))
        wrong = FORMS[form](chosen, row)
        if wrong != chosen:
            unasked += 1
            out.append({**chat, "rejected": wrong, "unasked_form": form})
rng.shuffle(out)
for chat in out:
    print(json.dumps(chat))
print(json.dumps({"per_form": per_form, "others": others, "unasked": unasked, "pairs": len(out)}), file=sys.stderr)
