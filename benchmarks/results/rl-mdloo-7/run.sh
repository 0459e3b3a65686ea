#!/bin/bash
# rl-mdloo-7: MDLOO from the adapter shipped as smollm2-135m-afm after rl-mdloo-6's decision (also the
# reference policy) on writing prompts, every other one asking for another language or capitals:
#   afmkit posttrain synth-if --frame writing --n 6000 --seed 54 --out prompts_s54.jsonl
#   python ../dpo-11/filter_prompts.py prompts_s54.jsonl ../longform-dev/longform_dev.jsonl ../dpo-4/dev200.jsonl > filtered.jsonl
#   python focus_prompts.py prompts_s54.jsonl filtered.jsonl > prompts.jsonl     # 1,330 train + 600 dev
# rl-mdloo-5's settings otherwise. Resumable: rerunning continues from the last checkpoint.
cd /work/runs/s54/rl7
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
grep -q '"qualifies": true' /work/dev/benchmarks/results/rl-mdloo-6/decision.json && SHIPPED=rl-mdloo-6 || SHIPPED=rl-mdloo-5
[ -d start_adapter ] || { cp -r /work/dev/src/afmkit/resources/smollm2_135m_afm start_adapter.tmp && mv start_adapter.tmp start_adapter && echo "start: $SHIPPED" > start_adapter.txt; }
RES=""; [ -d rl/checkpoints ] && RES="--resume"
afmkit posttrain rl --algo mdloo --init-adapter start_adapter --prompts prompts.jsonl --out rl \
  --k 4 --prompts-per-iteration 8 --inner-steps 2 --lr 2e-5 --beta 0.05 --max-new-tokens 384 \
  --unfinished-reward 0 --iterations 40 --dev-prompts 32 --dev-every 5 --train-batch 2 $RES >> rl.log 2>&1
echo RL_DONE >> rl.log
