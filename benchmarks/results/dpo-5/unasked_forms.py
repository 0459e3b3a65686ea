"""Answers in a form their prompt did not ask for, per eval folder (``afmkit eval ifeval --out``):
all lowercase or all capitals (answers with at least 20 letters, prompts asking no case and no
language), and starting with a quotation mark (prompts asking no quotation), with the strict
average, the answers at the token limit and the median words beside them.

Usage: unasked_forms.py EVAL_DIR [EVAL_DIR ...]"""

import json
import statistics
import sys
from pathlib import Path

for folder in map(Path, sys.argv[1:]):
    responses = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    asked = {
        json.loads(line)["key"]: json.loads(line)["instruction_id_list"]
        for line in (folder / "per_prompt.jsonl").read_text().splitlines()
    }
    results = json.loads((folder / "results.json").read_text())
    no_case = [r for r in responses if not any(i.startswith(("change_case", "language")) for i in asked[r["key"]])]
    letters = [r for r in no_case if sum(c.isalpha() for c in r["response"]) >= 20]
    no_quote = [r for r in responses if "startend:quotation" not in asked[r["key"]]]
    row = {
        "eval": str(folder),
        "strict_average": results["strict_average"],
        "at_limit": sum(r["finish_reason"] == "length" for r in responses),
        "answers": len(responses),
        "median_words": statistics.median(len(r["response"].split()) for r in responses),
        "unasked_lowercase": f"{sum(r['response'] == r['response'].lower() for r in letters)} of {len(no_case)}",
        "unasked_capitals": f"{sum(r['response'] == r['response'].upper() for r in letters)} of {len(no_case)}",
        "unasked_quote_starts": f"{sum(r['response'].lstrip().startswith(chr(34)) for r in no_quote)} of {len(no_quote)}",
    }
    print(json.dumps(row))
