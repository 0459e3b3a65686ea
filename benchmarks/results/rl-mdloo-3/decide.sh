#!/bin/bash
# After score.sh: the standing rule (../longform-dev/README.md) against the incumbent rl-mdloo-2
# (longform-dev 49.02, 25 answers at the 512-token limit, shakespeare_dev perplexity 34.77), applied
# mechanically; only if all three hold is IFEval measured, once (as ../rl-mdloo-2/ifeval.sh).
cd /work/runs/s51/rl
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
until grep -q SCORED perplexity.log 2>/dev/null; do sleep 15; done
python - > decision.json <<'PY'
import json
score = json.load(open("longform-rl3/results.json"))["strict_average"]
limit = sum(json.loads(line)["finish_reason"] == "length" for line in open("longform-rl3/responses.jsonl"))
dev = next(json.loads(line.split(" ", 2)[2])["perplexity"] for line in open("perplexity.log") if line.startswith("shakespeare_dev.txt"))
rule = {"longform_dev_higher": score > 49.02, "no_more_at_limit": limit <= 25, "dev_perplexity_within_2pct": dev <= 34.77 * 1.02}
print(json.dumps({"strict_average": score, "at_limit": limit, "dev_perplexity": dev, **rule, "qualifies": all(rule.values())}))
PY
cat decision.json
if grep -q '"qualifies": true' decision.json; then
  afmkit eval ifeval --adapter result_adapter --max-new-tokens 1024 --batch-size 64 --out ifeval-rl3 > ifeval.log 2> ifeval.err
fi
echo DECIDED >> decision.json
