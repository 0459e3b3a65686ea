#!/bin/bash
# rl-mdloo-9's result: the policy at iteration 40. Scored as rl-mdloo-5 to 8 (../rl-mdloo-8/score.sh):
# longform-dev and the drift texts; then the standing rule (../longform-dev/README.md) against the
# incumbent, the start adapter (start_adapter.txt): rl-mdloo-8 with the numbers of its decision.json
# if that qualified it, else rl-mdloo-7 with those of ../rl-mdloo-7/decision.json; applied
# mechanically; only if all three hold is IFEval measured, once.
# shakespeare_dev.txt: tiny shakespeare's characters 300,000-320,000; harmless_c.txt: the hh-rlhf
# harmless-base test file's `chosen` transcripts joined with no separator (../dpo-10/README.md).
cd /work/runs/rl9
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
until grep -q RL_DONE rl.log; do sleep 15; done
grep -o "iteration [0-9]*/40" rl.log | tail -1 > result_iteration.txt
cp -r rl/adapter result_adapter
afmkit eval ifeval --input /work/dev/benchmarks/results/longform-dev/longform_dev.jsonl --adapter result_adapter \
  --max-new-tokens 512 --batch-size 64 --out longform-rl9 > longform.log 2> longform.err
: > perplexity.log
for T in /work/runs/dpo12/shakespeare_dev.txt $AFMKIT_SHARED_DATA/pretrain/tinyshakespeare_input.txt /work/runs/dpo12/harmless_c.txt; do
  echo "$(basename $T) rl9 $(afmkit eval perplexity --text $T --max-chars 20000 --adapter result_adapter --json 2>/dev/null)" >> perplexity.log
done
echo SCORED >> perplexity.log
python - > decision.json <<'PY'
import json
start = open("start_adapter.txt").read().split()[-1]
best = json.loads(open(f"/work/dev/benchmarks/results/{start}/decision.json").readline())
incumbent = (best["strict_average"], best["at_limit"], best["dev_perplexity"])
score = json.load(open("longform-rl9/results.json"))["strict_average"]
limit = sum(json.loads(line)["finish_reason"] == "length" for line in open("longform-rl9/responses.jsonl"))
dev = next(json.loads(line.split(" ", 2)[2])["perplexity"] for line in open("perplexity.log") if line.startswith("shakespeare_dev.txt"))
rule = {"longform_dev_higher": score > incumbent[0], "no_more_at_limit": limit <= incumbent[1], "dev_perplexity_within_2pct": dev <= incumbent[2] * 1.02}
print(json.dumps({"incumbent": start, "strict_average": score, "at_limit": limit, "dev_perplexity": dev, **rule, "qualifies": all(rule.values())}))
PY
cat decision.json
if grep -q '"qualifies": true' decision.json; then
  afmkit eval ifeval --adapter result_adapter --max-new-tokens 1024 --batch-size 64 --out ifeval-rl9 > ifeval.log 2> ifeval.err
fi
echo DECIDED >> decision.json
