"""recovery-mix-2's rule (README.md): the continued adapter against the shipped one, both measured in
the same chain on the same CPU; writes decision.json, exits 0 only if all checks hold."""

import json
import sys
from pathlib import Path


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


base, new = rows("base_ppl.jsonl"), rows("new_ppl.jsonl")
dev_base = json.loads(Path("dev64-base/results.json").read_text())["strict_average"]
dev_new = json.loads(Path("dev64-new/results.json").read_text())["strict_average"]
checks = {
    "dev64 strict average above the shipped adapter's": (dev_new, dev_base, dev_new > dev_base),
    "shakespeare 20k ppl no worse": (
        new[0]["perplexity"],
        base[0]["perplexity"],
        new[0]["perplexity"] <= base[0]["perplexity"],
    ),
    "harmless 20k ppl no worse": (
        new[1]["perplexity"],
        base[1]["perplexity"],
        new[1]["perplexity"] <= base[1]["perplexity"],
    ),
}
limit = {
    name: sum(r["finish_reason"] == "length" for r in rows(f"{name}/responses.jsonl"))
    for name in ("dev64-base", "dev64-new")
}
out = {
    "checks": {k: {"new": n, "shipped": b, "holds": ok} for k, (n, b, ok) in checks.items()},
    "dev64_at_limit": limit,
    "ships": all(ok for *_, ok in checks.values()),
}
Path("decision.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out))
sys.exit(0 if out["ships"] else 1)
