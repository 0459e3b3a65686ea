"""rl-mdloo-7's train prompts: the filtered train prompts of a synth-if file, every other one asking
for a whole answer in another language or in capitals (the constraints whose answers run out of
tokens: README), the rest in their file order between them; then the file's dev split.

    python focus_prompts.py prompts_s54.jsonl filtered.jsonl > prompts.jsonl
"""

import json
import sys
from pathlib import Path

FOCUS = {"language:response_language", "change_case:english_capital"}

synth = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]
train = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines()]
focus = [row for row in train if FOCUS & set(row["instruction_id_list"])]
other = [row for row in train if not FOCUS & set(row["instruction_id_list"])]
pairs = min(len(focus), len(other))
rows = [row for pair in zip(focus[:pairs], other[:pairs]) for row in pair]
rows += [row for row in synth if row["split"] == "dev"]
for row in rows:
    print(json.dumps(row, ensure_ascii=False))
print(f"{len(focus)} focus and {len(other)} other train prompts; {2 * pairs} train rows written", file=sys.stderr)
