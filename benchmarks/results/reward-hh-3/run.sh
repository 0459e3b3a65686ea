#!/bin/bash
# reward-hh-3: reward-hh-2's command again (its weights were not kept), for the side-by-side of rl-mdloo-7
cd /work/runs/s55
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
RES=""; [ -d rm-hh ] && RES="--resume"
afmkit posttrain reward --data hh-rlhf --out rm-hh --lora-rank 16 --max-tokens 256 --batch 8 \
    --steps 100 --warmup 5 --lr 5e-4 --save-every 10 --held-out-limit 0 $RES > rm.log 2>&1 || exit 1
echo RM_DONE
