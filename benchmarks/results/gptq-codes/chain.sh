#!/bin/bash
# GPTQ codes on the named build (calibrated on the recovery text's head), then the shipped adapter's recovery recipe on it.
set -e
cd /work/runs/s48
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
TEXT=/work/runs/s48/mix/recovery_mix_text.txt
until grep -q MIX_DONE mix/make.out; do sleep 20; done
[ -s gptqmix/gptq_build.json ] || python gptq_build.py gptqmix $TEXT 0 32768 > gptqmix.log 2>&1
[ -s ppl_gptqmix_harmless.json ] || ./ppl.sh /work/runs/s48/gptqmix gptqmix
afmkit compress recover --model gptqmix --data $TEXT --steps 500 --batch 4 --seq-len 256 --save-every 25 \
    $( [ -d gptqmix/recovery.run ] && echo --resume ) > recover.log 2> recover.err
./ppl.sh /work/runs/s48/gptqmix gptqmix_rec
afmkit eval ifeval --model gptqmix --input /work/main/benchmarks/results/edit-data-1/dev64-prompts.jsonl \
    --max-new-tokens 512 --batch-size 64 --out dev64-gptqmix > dev64.log 2> dev64.err
echo CHAIN_DONE
