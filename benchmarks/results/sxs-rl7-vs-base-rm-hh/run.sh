#!/bin/bash
# sxs-rl7-vs-base-rm-hh: the shipped smollm2-135m-afm (rl-mdloo-7) against the base, graded by reward-hh-3
cd /work/runs/s55
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
while ! grep -q RM_DONE rm.out 2>/dev/null; do sleep 30; done
afmkit eval sxs --a smollm2-135m-afm --b smollm2-135m-instruct \
    --prompts /work/dev/benchmarks/results/sxs-mix-vs-base-rm-hh/sxs_prompts.jsonl \
    --grader reward --reward rm-hh --max-new-tokens 384 --batch-size 16 --out sxs-rl7-base > sxs.log 2>&1 || exit 1
echo SXS_DONE
