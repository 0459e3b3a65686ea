#!/bin/bash
# recovery-afm-1 did not ship (rule 2 failed on harmless); its IFEval, measured once after the decision, for information.
cd /work/runs/recafm
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
afmkit eval ifeval --model smollm2-135m-instruct-3.5bpw --no-recovery --adapter rec --max-new-tokens 1024 --batch-size 64 --out ifeval-new > ifeval.log 2> ifeval.err
echo IFEVAL_DONE
