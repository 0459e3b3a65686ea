"""dpo-6's pairs: dpo-4's and dpo-5's pair files in one, each line once (dpo-5 replayed some of
dpo-4's), dpo-4's first.

Usage: merge_pairs.py ../dpo-4/pairs.jsonl.gz ../dpo-5/pairs.jsonl.gz > pairs.jsonl"""

import gzip
import sys

seen = set()
for path in sys.argv[1:]:
    with gzip.open(path, "rt") as lines:
        for line in lines:
            if line not in seen:
                seen.add(line)
                sys.stdout.write(line)
print(f"{len(seen)} pairs", file=sys.stderr)
