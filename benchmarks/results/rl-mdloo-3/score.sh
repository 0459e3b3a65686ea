#!/bin/bash
# rl-mdloo-3's result: the policy at iteration 80, or the last saved at 11:20 UTC (README). Then
# longform-dev and the two drift guards, as dpo-9's commands.
cd /work/runs/s51/rl
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
until grep -q RL_DONE rl.log || [ $(date +%H%M) -ge 1120 ]; do sleep 15; done
if ! grep -q RL_DONE rl.log; then
  pkill -TERM -f "afmkit posttrain rl"; sleep 20; pkill -KILL -f "afmkit posttrain rl"
  echo "STOPPED at $(date +%H:%M)" >> rl.log
fi
grep -o "iteration [0-9]*/80" rl.log | tail -1 > result_iteration.txt
cp -r rl/adapter result_adapter
afmkit eval ifeval --input /work/dev/benchmarks/results/longform-dev/longform_dev.jsonl --adapter result_adapter \
  --max-new-tokens 512 --batch-size 64 --out longform-rl3 > longform.log 2> longform.err
: > perplexity.log
for T in /work/runs/dpo12/shakespeare_dev.txt $AFMKIT_SHARED_DATA/pretrain/tinyshakespeare_input.txt /work/runs/dpo12/harmless_c.txt; do
  echo "$(basename $T) rl3 $(afmkit eval perplexity --text $T --max-chars 20000 --adapter result_adapter --json 2>/dev/null)" >> perplexity.log
done
echo SCORED >> perplexity.log
