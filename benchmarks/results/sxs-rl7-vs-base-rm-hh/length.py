"""How the side-by-side's outcomes go with answer length (run in this folder: python length.py).

Per prompt the outcome is the sign of the summed judgments over both orders (as `afmkit eval sxs`);
length is the answer's new tokens. Prints medians, answers at the 384-token limit, how often the
longer answer won, the outcome split by which answer was longer, and the two-sided sign test.
"""

import json
import statistics
from math import comb
from pathlib import Path


def rows(path):
    return {r["key"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


a, b = rows("responses_a.jsonl"), rows("responses_b.jsonl")
score = {}
for g in map(json.loads, Path("grades.jsonl").read_text().splitlines()):
    score[g["pair"]] = score.get(g["pair"], 0) + {"a": 1, "b": -1}.get(g["winner"], 0)
for name, r in (("A", a), ("B", b)):
    tokens = [x["new_tokens"] for x in r.values()]
    words = [len(x["response"].split()) for x in r.values()]
    at_limit = sum(x["finish_reason"] == "length" for x in r.values())
    print(
        f"{name}: median {statistics.median(tokens)} tokens / {statistics.median(words)} words, {at_limit} at the limit"
    )
decided = [(s, a[p]["new_tokens"], b[p]["new_tokens"]) for p, s in score.items() if s != 0]
unequal = [(s, la, lb) for s, la, lb in decided if la != lb]
longer_won = sum((s > 0) == (la > lb) for s, la, lb in unequal)
print(f"the longer answer won {longer_won} of {len(unequal)} decided prompts")
for label, keep in (("A shorter", lambda la, lb: la < lb), ("A longer", lambda la, lb: la > lb)):
    part = [s for s, la, lb in unequal if keep(la, lb)]
    print(f"{label}: {len(part)} prompts, A won {sum(s > 0 for s in part)}")
wins, n = sum(s > 0 for s, _, _ in decided), len(decided)
tail = sum(comb(n, i) for i in range(min(wins, n - wins) + 1)) / 2**n
print(f"A won {wins} of {n} decided prompts; two-sided sign test p = {min(1.0, 2 * tail):.3f}")
