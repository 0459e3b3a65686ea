"""Prompts for replay chats: synth-if train prompts that no DPO pair of dpo-4 or dpo-5 uses (nor
adds a form to), past
the first 320 (loop-cut's), asking none of the forms the pairs are about (lowercase, capitals,
quotation, the repeated request); a seeded sample of N.

Usage: replay_prompts.py PROMPTS_20K PAIRS.jsonl N SEED > replay_prompts.jsonl"""

import json
import random
import sys
from pathlib import Path

FORMS = {
    "change_case:english_lowercase",
    "change_case:english_capital",
    "startend:quotation",
    "combination:repeat_prompt",
}

prompts_file, pairs_file, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# an added-form pair's id is its prompt's id plus "+form"
paired = {str(json.loads(line).get("prompt_id")).split("+")[0] for line in Path(pairs_file).read_text().splitlines()}
eligible = [
    prompt
    for number, prompt in enumerate(map(json.loads, Path(prompts_file).read_text().splitlines()))
    if prompt["split"] == "train"
    and number >= 320
    and prompt["id"] not in paired
    and not FORMS & set(prompt["instruction_id_list"])
]
for prompt in random.Random(seed).sample(eligible, n):
    print(json.dumps(prompt))
print(f"{len(eligible)} eligible, {n} drawn", file=sys.stderr)
