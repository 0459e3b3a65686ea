#!/bin/bash
# rl-mdloo-9: rl-mdloo-7's recipe from the adapter shipped after rl-mdloo-8's decision (also the
# reference policy), on a fresh seed's prompts, with the plain-text anchor to the base (README.md):
#   afmkit posttrain synth-if --frame writing --n 6000 --seed 56 --out prompts_s56.jsonl
#   python ../dpo-11/filter_prompts.py prompts_s56.jsonl ../longform-dev/longform_dev.jsonl ../dpo-4/dev200.jsonl > filtered.jsonl
#   python ../rl-mdloo-7/focus_prompts.py prompts_s56.jsonl filtered.jsonl > prompts.jsonl
#   python make_anchor.py ..     # anchor.txt
# Resumable: rerunning continues from the last checkpoint.
mkdir -p /work/runs/rl9 && cd /work/runs/rl9
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
R=/work/dev/benchmarks/results
if [ ! -s prompts.jsonl ]; then
  afmkit posttrain synth-if --frame writing --n 6000 --seed 56 --out prompts_s56.jsonl > synth.log 2>&1 || exit 1
  python $R/dpo-11/filter_prompts.py prompts_s56.jsonl $R/longform-dev/longform_dev.jsonl $R/dpo-4/dev200.jsonl > filtered.jsonl || exit 1
  python $R/rl-mdloo-7/focus_prompts.py prompts_s56.jsonl filtered.jsonl > prompts.tmp 2> focus.log && mv prompts.tmp prompts.jsonl || exit 1
fi
[ -s anchor.txt ] || python $R/rl-mdloo-9/make_anchor.py $R > anchor.log || exit 1
grep -q '"qualifies": true' $R/rl-mdloo-8/decision.json && SHIPPED=rl-mdloo-8 || SHIPPED=rl-mdloo-7
[ -d start_adapter ] || { cp -r /work/dev/src/afmkit/resources/smollm2_135m_afm start_adapter.tmp && mv start_adapter.tmp start_adapter && echo "start: $SHIPPED" > start_adapter.txt; }
RES=""; [ -d rl/checkpoints ] && RES="--resume"
afmkit posttrain rl --algo mdloo --init-adapter start_adapter --prompts prompts.jsonl --out rl \
  --k 4 --prompts-per-iteration 8 --inner-steps 2 --lr 2e-5 --beta 0.05 --max-new-tokens 384 \
  --unfinished-reward 0 --iterations 40 --dev-prompts 32 --dev-every 5 --train-batch 2 \
  --anchor-text anchor.txt --anchor-weight 10 $RES >> rl.log 2>&1
echo RL_DONE >> rl.log
