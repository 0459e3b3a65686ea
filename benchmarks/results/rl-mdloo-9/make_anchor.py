"""rl-mdloo-9's anchor text: dpo-12's (tiny Shakespeare from character 400,000 interleaved, 4,000
characters at a time, with the `chosen` transcripts of hh-rlhf helpful-base test; ../dpo-12/make_data.py),
less every transcript whose first Human turn is a question of longform-dev, dev200 or the
side-by-side prompts (so the anchor never holds the base's text on a question the decision or the
side-by-side asks). Neither drift text is in it: shakespeare_dev.txt is characters 300,000-320,000,
the table's Shakespeare the first 20,000, harmless_c.txt harmless-base test.

    AFMKIT_SHARED_DATA=... python make_anchor.py RESULTS_DIR    # writes anchor.txt here
"""

import json
import os
import sys
from pathlib import Path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


results = Path(sys.argv[1])
asked = [
    r["prompt"]
    for name in ("longform-dev/longform_dev.jsonl", "dpo-4/dev200.jsonl")
    for r in read_jsonl(results / name)
]
asked += [r["prompt"] for r in read_jsonl(results / "sxs-mix-vs-base-rm-hh/sxs_prompts.jsonl")]
shared = os.environ["AFMKIT_SHARED_DATA"]
shakespeare = Path(f"{shared}/pretrain/tinyshakespeare_input.txt").read_text()[400000:]
dialogues, dropped = [], 0
for row in read_jsonl(f"{shared}/preference/hh-rlhf_helpful-base_test.jsonl"):
    text = row["chosen"].strip()
    question = text.removeprefix("Human:").split("\n\nAssistant:")[0].strip()
    if question and any(question in prompt for prompt in asked):
        dropped += 1
        continue
    dialogues.append(text)
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
    f"anchor: {sum(map(len, out))} characters; {len(dialogues)} dialogues kept, {dropped} dropped (asked by a dev split or the side-by-side)"
)
