"""dpo-8's training pairs: from edit-data's chats, the lines with a rejected answer (a rewrite that
follows more constraints than the answer it rewrote). Every pair whose prompt asks for one of the
families the DPO adapters fail in long-form writing (longform-dev) and the editor can rewrite
(paragraphs with `***`, the n-th paragraph's first word, no commas) comes first, then a seeded
random draw of the rest, to N pairs in all.

    python select_pairs.py longform_10k.jsonl lf_pairs.jsonl N SEED > pairs.jsonl
"""

import json
import random
import sys
from collections import Counter
from pathlib import Path

TARGETS = {
    "length_constraints:number_paragraphs",
    "length_constraints:nth_paragraph_first_word",
    "punctuation:no_comma",
}


def main(prompts_path, pairs_path, n, seed):
    families = {}
    for line in Path(prompts_path).read_text().splitlines():
        row = json.loads(line)
        families[row["id"]] = set(row["instruction_id_list"])
    pairs = [row for row in map(json.loads, Path(pairs_path).read_text().splitlines()) if "rejected" in row]
    targeted = [r for r in pairs if TARGETS & families[r["prompt_id"]]]
    rest = [r for r in pairs if not TARGETS & families[r["prompt_id"]]]
    random.Random(seed).shuffle(rest)
    chosen = (targeted + rest)[:n]
    random.Random(seed + 1).shuffle(chosen)
    for r in chosen:
        print(json.dumps(r, ensure_ascii=False))
    count = Counter(f for r in chosen for f in families[r["prompt_id"]])
    print(f"{len(pairs)} pairs, {len(targeted)} targeted, {len(chosen)} written", file=sys.stderr)
    print(json.dumps(dict(count.most_common())), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
