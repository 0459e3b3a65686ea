#!/bin/bash
# rl-mdloo-6's result: the policy at iteration 80, or the last saved when this script stops the run at
# 21:20 UTC (README). Scored as rl-mdloo-5 (../rl-mdloo-5/score.sh): longform-dev and the drift
# texts; then the standing rule (../longform-dev/README.md) against the incumbent rl-mdloo-5
# (longform-dev 52.73, 15 answers at the 512-token limit, shakespeare_dev perplexity 34.81), applied
# mechanically; only if all three hold is IFEval measured, once.
# shakespeare_dev.txt: tiny shakespeare's characters 300,000-320,000; harmless_c.txt: the hh-rlhf
# harmless-base test file's `chosen` transcripts joined with no separator (../dpo-10/README.md).
cd /work/runs/s53/rl6
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
until grep -q RL_DONE rl.log || [ $(date +%H%M) -ge 2120 ]; do sleep 15; done
if ! grep -q RL_DONE rl.log; then
  pkill -TERM -f "afmkit posttrain rl"; sleep 20; pkill -KILL -f "afmkit posttrain rl"
  echo "STOPPED at $(date +%H:%M)" >> rl.log
fi
grep -o "iteration [0-9]*/80" rl.log | tail -1 > result_iteration.txt
cp -r rl/adapter result_adapter
afmkit eval ifeval --input /work/dev/benchmarks/results/longform-dev/longform_dev.jsonl --adapter result_adapter \
  --max-new-tokens 512 --batch-size 64 --out longform-rl6 > longform.log 2> longform.err
: > perplexity.log
for T in /work/runs/dpo12/shakespeare_dev.txt $AFMKIT_SHARED_DATA/pretrain/tinyshakespeare_input.txt /work/runs/dpo12/harmless_c.txt; do
  echo "$(basename $T) rl6 $(afmkit eval perplexity --text $T --max-chars 20000 --adapter result_adapter --json 2>/dev/null)" >> perplexity.log
done
echo SCORED >> perplexity.log
python - > decision.json <<'PY'
import json
score = json.load(open("longform-rl6/results.json"))["strict_average"]
limit = sum(json.loads(line)["finish_reason"] == "length" for line in open("longform-rl6/responses.jsonl"))
dev = next(json.loads(line.split(" ", 2)[2])["perplexity"] for line in open("perplexity.log") if line.startswith("shakespeare_dev.txt"))
rule = {"longform_dev_higher": score > 52.73, "no_more_at_limit": limit <= 15, "dev_perplexity_within_2pct": dev <= 34.81 * 1.02}
print(json.dumps({"strict_average": score, "at_limit": limit, "dev_perplexity": dev, **rule, "qualifies": all(rule.values())}))
PY
cat decision.json
if grep -q '"qualifies": true' decision.json; then
  afmkit eval ifeval --adapter result_adapter --max-new-tokens 1024 --batch-size 64 --out ifeval-rl6 > ifeval.log 2> ifeval.err
fi
echo DECIDED >> decision.json
