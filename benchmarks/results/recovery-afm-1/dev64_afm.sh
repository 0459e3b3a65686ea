#!/bin/bash
# dev64 of smollm2-135m-afm (as it ships: int4 + its adapter), for scale beside the 3.5-bit rows; after the IFEval run.
cd /work/runs/recafm
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
until grep -q IFEVAL_DONE ifeval_after.out 2>/dev/null; do sleep 15; done
afmkit eval ifeval --model smollm2-135m-afm --input /work/dev/benchmarks/results/edit-data-1/dev64-prompts.jsonl --max-new-tokens 512 --batch-size 64 --out dev64-afm > dev64-afm.log 2> dev64-afm.err
echo DEV64_AFM_DONE
