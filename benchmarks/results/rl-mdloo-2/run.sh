#!/bin/bash
# rl-mdloo-2: MDLOO from the shipped adapter (dpo-10, smollm2-135m-afm), session 50.
# Prompts: synth-if --n 4000 --seed 50, train questions that are in longform-dev or dev200 removed
# (dpo-11's filter_prompts.py), its 400 dev prompts kept for the dev score. Settings: rl-mdloo-1's,
# except the learning rate (the command's default 2e-5; rl-mdloo-1's 1e-5 hardly moved the policy
# in 8 iterations) and the start. Resumable: rerunning continues from the last checkpoint.
cd /work/runs/s50/rl
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
RES=""; [ -d rl/checkpoints ] && RES="--resume"
afmkit posttrain rl --algo mdloo --init-adapter /work/dev/benchmarks/results/dpo-10/adapter --prompts prompts.jsonl --out rl \
  --k 4 --prompts-per-iteration 8 --inner-steps 2 --lr 2e-5 --beta 0.05 --max-new-tokens 384 \
  --unfinished-reward 0 --iterations 40 --dev-prompts 32 --dev-every 5 --train-batch 2 $RES >> rl.log 2>&1
echo RL_DONE >> rl.log
