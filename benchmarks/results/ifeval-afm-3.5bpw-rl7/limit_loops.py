"""Answers at the token limit and answers ending in a loop, for IFEval folders given as arguments
(python limit_loops.py FOLDER...). Loops by afmkit.posttrain.loop_cut.loop_start."""

import json
import sys
from pathlib import Path

from afmkit.posttrain.loop_cut import loop_start

for folder in sys.argv[1:]:
    rows = [json.loads(line) for line in Path(folder, "responses.jsonl").read_text().splitlines()]
    at_limit = sum(r["finish_reason"] == "length" for r in rows)
    loops = sum(loop_start(r["response"]) is not None for r in rows)
    print(f"{folder}: {len(rows)} answers, {at_limit} at the limit ({100 * at_limit / len(rows):.1f}%), {loops} loops")
