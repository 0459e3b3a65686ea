#!/bin/bash
# IFEval of the named 3.5-bit model (recovery adapter applied) on this Xeon with AMX, at main f0e8aee:
# session 49 changed this CPU's bits (AMX sums) and re-measured perplexity and dev64, not IFEval.
cd /work/runs/s50
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data
afmkit eval ifeval --model smollm2-135m-instruct-3.5bpw --max-new-tokens 1024 --batch-size 64 --out ifeval-named-3.5bpw-xeon > ifeval.log 2> ifeval.err
echo IFEVAL_DONE >> ifeval.log
