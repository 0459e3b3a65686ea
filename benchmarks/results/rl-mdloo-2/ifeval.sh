#!/bin/bash
# rl-mdloo-2's IFEval, measured once after the standing rule's decision (longform-dev README), session 50.
cd /work/runs/s50/rl
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
afmkit eval ifeval --adapter result_adapter --max-new-tokens 1024 --batch-size 64 --out ifeval-rl2 > ifeval.log 2> ifeval.err
echo IFEVAL_DONE >> ifeval.log
