"""longform-dev answers that ran to the token limit, by whether their prompt asked for another
language, for capitals, or neither: `python limit_by_constraint.py ../longform-dev/longform-rl5 ...`"""

import json
import sys
from pathlib import Path

SPLIT = Path(__file__).resolve().parent.parent / "longform-dev" / "longform_dev.jsonl"


def kind(ids: list[str]) -> str:
    if "language:response_language" in ids:
        return "language"
    return "capitals" if "change_case:english_capital" in ids else "other"


asked = {row["key"]: kind(row["instruction_id_list"]) for row in map(json.loads, SPLIT.read_text().splitlines())}
for folder in sys.argv[1:]:
    counts = {name: [0, 0] for name in ("language", "capitals", "other")}
    for row in map(json.loads, Path(folder, "responses.jsonl").read_text().splitlines()):
        c = counts[asked[row["key"]]]
        c[0] += row["finish_reason"] == "length"
        c[1] += 1
    print(Path(folder).name, "  ".join(f"{name} {limit}/{n}" for name, (limit, n) in counts.items()))
