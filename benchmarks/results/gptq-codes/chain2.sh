#!/bin/bash
# After the recovery run (started by chain.sh, whose shell was stopped to drop its dev64 step): perplexity, then IFEval.
cd /work/runs/s48
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
while pgrep -f "compress recover --model gptqmix" > /dev/null; do sleep 20; done
./ppl.sh /work/runs/s48/gptqmix gptqmix_rec
afmkit eval ifeval --model gptqmix --batch-size 64 --out ifeval-gptqmix-rec > ifeval.log 2> ifeval.err
echo CHAIN2_DONE
