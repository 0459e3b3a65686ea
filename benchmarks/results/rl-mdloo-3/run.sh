#!/bin/bash
# rl-mdloo-3: rl-mdloo-2 continued from its iteration-40 checkpoint to iteration 80, nothing else
# changed (the same prompts, settings, reference dpo-10; rl.json allows --iterations to change on
# --resume, and the rollout seeds are per iteration, so this is the uninterrupted 80-iteration run).
# Waits for the afm-3.5bpw IFEval so the two never share the CPU. Rerunning resumes.
cd /work/runs/s51/rl
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
until grep -q AFM35_DONE /work/runs/afm35rl2/run.out 2>/dev/null; do sleep 15; done
afmkit posttrain rl --algo mdloo --init-adapter /work/dev/benchmarks/results/dpo-10/adapter --prompts prompts.jsonl --out rl \
  --k 4 --prompts-per-iteration 8 --inner-steps 2 --lr 2e-5 --beta 0.05 --max-new-tokens 384 \
  --unfinished-reward 0 --iterations 80 --dev-prompts 32 --dev-every 5 --train-batch 2 --resume >> rl.log 2>&1
echo RL_DONE >> rl.log
