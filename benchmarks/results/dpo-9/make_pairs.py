"""dpo-9's training pairs: dpo-8's 600 long-form pairs plus every loop-cut pair of dpo-5's greedy
answers to other long-form train prompts (the answer cut where its loop first repeats, preferred
to the whole loop), shuffled together with a seed so the held-out share holds both kinds.

    python make_pairs.py ../dpo-8/pairs.jsonl loopcut.jsonl SEED > pairs.jsonl
"""

import json
import random
import sys
from collections import Counter
from pathlib import Path


def main(form_pairs_path, loop_cut_path, seed):
    form_pairs = [json.loads(line) for line in Path(form_pairs_path).read_text().splitlines()]
    cut_pairs = [
        row
        for row in map(json.loads, Path(loop_cut_path).read_text().splitlines())
        if row.get("kind") == "cut" and "rejected" in row
    ]
    for row in form_pairs:
        row.setdefault("kind", "form")
    pairs = form_pairs + cut_pairs
    random.Random(seed).shuffle(pairs)
    for row in pairs:
        print(json.dumps(row, ensure_ascii=False))
    print(json.dumps(Counter(row["kind"] for row in pairs)), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
