"""recovery-both-1's rule (README.md): rules 2 and 3 against recovery-mix-1's committed numbers."""

import json
import sys
from pathlib import Path


def last_json(path: str) -> dict:
    return json.loads(Path(path).read_text().strip().splitlines()[-1])


shakespeare, harmless = last_json("ppl_shakespeare.log"), last_json("ppl_harmless.log")
dev = json.loads(Path("dev64/results.json").read_text())
responses = [json.loads(line) for line in Path("dev64/responses.jsonl").read_text().splitlines()]
at_limit = sum(r["finish_reason"] == "length" for r in responses)
checks = {
    "dev64 strict average > 25.53": (dev["strict_average"], dev["strict_average"] > 25.53),
    "shakespeare 20k ppl <= 36.4902": (shakespeare["perplexity"], shakespeare["perplexity"] <= 36.4901699466001),
    "harmless 20k ppl <= 11.6838": (harmless["perplexity"], harmless["perplexity"] <= 11.683766585468144),
}
out = {
    "checks": {k: {"value": v, "holds": ok} for k, (v, ok) in checks.items()},
    "dev64": dev,
    "dev64_at_limit": at_limit,
    "ships": all(ok for _, ok in checks.values()),
}
Path("decision.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out["checks"]), "dev64 at limit", at_limit, "SHIPS" if out["ships"] else "DOES NOT SHIP")
sys.exit(0 if out["ships"] else 1)
