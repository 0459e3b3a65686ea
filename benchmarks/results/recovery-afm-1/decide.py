"""recovery-afm-1's rule (README.md), applied to a chain folder: python decide.py RUN_DIR."""

import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
# smollm2-135m-afm-3.5bpw as it ships (the stacked adapters), session 45 on this Intel Xeon,
# the same commands (benchmarks/results/ifeval-afm-3.5bpw/perplexity.log).
STACK_SHAKESPEARE, STACK_HARMLESS = 36.57282607135673, 11.889118053367522


def dev(name: str) -> tuple[float, int]:
    res = json.loads((run / name / "results.json").read_text())
    rows = [json.loads(line) for line in (run / name / "responses.jsonl").read_text().splitlines()]
    return res["strict_average"], sum(r["finish_reason"] == "length" for r in rows)


ppl = {}
for line in (run / "perplexity.log").read_text().splitlines():
    _, text, blob = line.split(" ", 2)
    ppl[text] = json.loads(blob)["perplexity"]
(stack, stack_limit), (new, new_limit) = dev("dev64-stack"), dev("dev64-new")
checks = {
    f"dev64 strict average > the stack's {stack}": (new, new > stack),
    f"shakespeare 20k ppl <= {STACK_SHAKESPEARE:.4f}": (
        ppl["tinyshakespeare_input.txt"],
        ppl["tinyshakespeare_input.txt"] <= STACK_SHAKESPEARE,
    ),
    f"harmless 20k ppl <= {STACK_HARMLESS:.4f}": (ppl["harmless_c.txt"], ppl["harmless_c.txt"] <= STACK_HARMLESS),
}
print(
    json.dumps(
        {
            "checks": {k: {"value": v, "holds": ok} for k, (v, ok) in checks.items()},
            "dev64_at_limit": {"stack": stack_limit, "new": new_limit},
            "ship": all(ok for _, ok in checks.values()),
        },
        indent=1,
    )
)
