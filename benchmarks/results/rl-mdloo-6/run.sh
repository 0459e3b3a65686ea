#!/bin/bash
# rl-mdloo-6: rl-mdloo-5's run (shipped as smollm2-135m-afm since session 53) continued from its
# iteration-40 checkpoint to iteration 80, nothing else changed (as rl-mdloo-3 continued rl-mdloo-2).
# The run folder is a copy of rl-mdloo-5's (/work/runs/s53/rl5/rl and its prompts.jsonl), so
# rl-mdloo-5's own stays as it ended. Resumable: rerunning continues from the last checkpoint.
cd /work/runs/s53/rl6
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
afmkit posttrain rl --algo mdloo --init-adapter /work/dev/benchmarks/results/rl-mdloo-3/adapter --prompts prompts.jsonl --out rl \
  --k 4 --prompts-per-iteration 8 --inner-steps 2 --lr 2e-5 --beta 0.05 --max-new-tokens 384 \
  --unfinished-reward 0 --iterations 80 --dev-prompts 32 --dev-every 5 --train-batch 2 --resume >> rl.log 2>&1
echo RL_DONE >> rl.log
