"""One row of the dpo-9 table for an ifeval output folder: strict average, prompt / instruction,
answers at the token limit, loops, median words."""

import json
import statistics
import sys
from pathlib import Path

from afmkit.posttrain.verifiable import is_loop

for folder in sys.argv[1:]:
    results = json.loads((Path(folder) / "results.json").read_text())
    rows = [json.loads(line) for line in (Path(folder) / "responses.jsonl").read_text().splitlines()]
    at_limit = sum(r["finish_reason"] == "length" for r in rows)
    loops = sum(is_loop(r["response"]) for r in rows)
    words = statistics.median(len(r["response"].split()) for r in rows)
    print(
        f"{folder}: {results['strict_average']:.2f} | {results['prompt_strict']} / {results['inst_strict']} | "
        f"{at_limit} of {len(rows)} at the limit | {loops} loops | median {words} words"
    )
