#!/bin/bash
# smollm2-135m-afm-3.5bpw (the shipped post-training adapter on the 3.5-bit build, added to its
# recovery adapter) beside smollm2-135m-afm, on the issue-13 table's texts; then IFEval once.
# Waits for dpo-12's chain (CHAIN_DONE) so the two never share the CPU, and for GO (the adapter that ships is in place).
cd /work/runs/afm35
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
until grep -q CHAIN_DONE /work/runs/dpo12/chain.out 2>/dev/null && [ -f GO ]; do sleep 20; done
if [ ! -f PPL_DONE ]; then
  : > perplexity.log
  for M in smollm2-135m-afm smollm2-135m-afm-3.5bpw; do
    for T in /work/shared/data/pretrain/tinyshakespeare_input.txt /work/runs/dpo12/harmless_c.txt; do
      echo "$M $(basename $T) $(afmkit eval perplexity --model $M --text $T --max-chars 20000 --json 2>/dev/null)" >> perplexity.log
    done
  done
  touch PPL_DONE
fi
afmkit eval ifeval --model smollm2-135m-afm-3.5bpw --max-new-tokens 1024 --batch-size 64 --out ifeval-afm-3.5bpw > ifeval.log 2> ifeval.err
echo AFM35_DONE
