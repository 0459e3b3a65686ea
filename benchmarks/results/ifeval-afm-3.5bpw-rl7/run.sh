#!/bin/bash
# smollm2-135m-afm-3.5bpw once smollm2-135m-afm ships rl-mdloo-7 (the 3.5-bit build, its shipped recovery
# adapter recovery-mix-1, and rl-mdloo-7's adapter added to it): perplexity on the issue-13 table's texts,
# then IFEval once. The same commands as ../ifeval-afm-3.5bpw-rl5/run.sh (rl-mdloo-5's).
cd /work/runs/s55/afm35rl7
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
while ! grep -q SXS_DONE ../sxs.out 2>/dev/null; do sleep 30; done
if [ ! -f PPL_DONE ]; then
  : > perplexity.log
  for M in smollm2-135m-afm smollm2-135m-afm-3.5bpw; do
    for T in /work/shared/data/pretrain/tinyshakespeare_input.txt /work/runs/dpo12/harmless_c.txt; do
      echo "$M $(basename $T) $(afmkit eval perplexity --model $M --text $T --max-chars 20000 --json 2>/dev/null)" >> perplexity.log
    done
  done
  touch PPL_DONE
fi
afmkit eval ifeval --model smollm2-135m-afm-3.5bpw --max-new-tokens 1024 --batch-size 64 --out ifeval-afm-3.5bpw-rl7 > ifeval.log 2> ifeval.err
echo AFM35_DONE
