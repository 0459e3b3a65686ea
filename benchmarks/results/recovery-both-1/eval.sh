#!/bin/bash
# recovery-both-1's rule 2 and 3: dev64 (synth-if dev, 512 new tokens, greedy) and held-out perplexity.
set -e
cd /work/runs/recboth
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data
python - <<'PY'
import json; r = json.load(open("both/recovery.json")); assert r["steps_done"] == 500, r["steps_done"]
PY
M=/work/runs/recboth/both
[ -s ppl_shakespeare.log ] || afmkit eval perplexity --model $M --text /work/shared/data/pretrain/tinyshakespeare_input.txt \
    --max-chars 20000 --json > ppl_shakespeare.log 2> ppl_shakespeare.err
[ -s ppl_harmless.log ] || afmkit eval perplexity --model $M --text /work/runs/dpo10/harmless_c.txt \
    --max-chars 20000 --json > ppl_harmless.log 2> ppl_harmless.err
[ -s dev64/results.json ] || afmkit eval ifeval --model $M --input /work/main/benchmarks/results/edit-data-1/dev64-prompts.jsonl \
    --max-new-tokens 512 --batch-size 64 --out dev64 > dev64.log 2> dev64.err
echo EVAL_DONE
