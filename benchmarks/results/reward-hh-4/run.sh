#!/bin/bash
# reward-hh-4 (README.md): reward-hh-3's command for one epoch (358 steps) instead of 100, then the
# side-by-side of rl-mdloo-7 graded again with it (the answers are reward-hh-3's side-by-side's).
# Rerunning resumes the training and keeps finished judgments.
mkdir -p /work/runs/rm4 && cd /work/runs/rm4
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
R=/work/dev/benchmarks/results
RES=""; [ -d rm-hh-epoch ] && RES="--resume"
[ -s rm-hh-epoch/report.json ] || afmkit posttrain reward --data hh-rlhf --out rm-hh-epoch --lora-rank 16 --max-tokens 256 --batch 8 \
    --steps 358 --warmup 5 --lr 5e-4 --save-every 10 --held-out-limit 0 $RES > rm.log 2>&1 || exit 1
if [ ! -s sxs-rl7-base/responses_b.jsonl ]; then  # the same answers, graded by the new model
  mkdir -p sxs-rl7-base && cp $R/sxs-rl7-vs-base-rm-hh/responses_{a,b}.jsonl $R/sxs-rl7-vs-base-rm-hh/responses_{a,b}.settings.json sxs-rl7-base/
fi
afmkit eval sxs --a smollm2-135m-afm --b smollm2-135m-instruct --prompts $R/sxs-mix-vs-base-rm-hh/sxs_prompts.jsonl \
    --grader reward --reward rm-hh-epoch --max-new-tokens 384 --batch-size 16 --out sxs-rl7-base > sxs.log 2>&1 || exit 1
echo RM4_DONE
