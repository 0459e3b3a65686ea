#!/bin/bash
# rl-mdloo-5: MDLOO from rl-mdloo-3 (also the reference policy) on long-form writing prompts, IFEval's
# kind of task: synth-if --frame writing --n 4000 --seed 53, the train questions in longform-dev or
# dev200 removed (../dpo-11/filter_prompts.py), its 400 dev prompts kept. rl-mdloo-2/3's settings
# otherwise (--unfinished-reward 0: an answer cut at 384 tokens or stopped as a loop earns nothing).
# Resumable: rerunning continues from the last checkpoint.
#   afmkit posttrain synth-if --frame writing --n 4000 --seed 53 --out prompts_s53.jsonl
#   python ../dpo-11/filter_prompts.py prompts_s53.jsonl ../longform-dev/longform_dev.jsonl ../dpo-4/dev200.jsonl > prompts.jsonl
#   grep '"split": "dev"' prompts_s53.jsonl >> prompts.jsonl            # 3,240 train + 400 dev
cd /work/runs/s53/rl5
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
RES=""; [ -d rl/checkpoints ] && RES="--resume"
afmkit posttrain rl --algo mdloo --init-adapter /work/dev/benchmarks/results/rl-mdloo-3/adapter --prompts prompts.jsonl --out rl \
  --k 4 --prompts-per-iteration 8 --inner-steps 2 --lr 2e-5 --beta 0.05 --max-new-tokens 384 \
  --unfinished-reward 0 --iterations 40 --dev-prompts 32 --dev-every 5 --train-batch 2 $RES >> rl.log 2>&1
echo RL_DONE >> rl.log
