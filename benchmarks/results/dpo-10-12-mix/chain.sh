#!/bin/bash
# dpo-10-12-mix (benchmarks/results/dpo-10-12-mix/README.md): mix, longform-dev, guards; IFEval once DECIDED exists.
cd /work/runs/mix1012
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data
R=/work/main/benchmarks/results
D=/work/dev/benchmarks/results
until grep -q AFM35_DONE /work/runs/afm35/run.out 2>/dev/null; do sleep 20; done
[ -f adapter/adapter_config.json ] || afmkit adapter mix --adapters $R/dpo-10/adapter,$D/dpo-12/adapter --weights 0.5,0.5 --out adapter > mix.log 2>&1 || exit 1
[ -f longform-mix/results.json ] || afmkit eval ifeval --input $R/longform-dev/longform_dev.jsonl --adapter adapter \
  --max-new-tokens 512 --batch-size 64 --out longform-mix > longform.log 2> longform.err || exit 1
if [ ! -f GUARDS_DONE ]; then
  : > perplexity.log
  for T in shakespeare_dev.txt harmless_c.txt; do
    echo "$T mix $(afmkit eval perplexity --text $T --max-chars 20000 --adapter adapter --json 2>/dev/null)" >> perplexity.log
  done
  touch GUARDS_DONE
fi
while [ ! -f DECIDED ]; do sleep 20; done
afmkit eval ifeval --adapter adapter --max-new-tokens 1024 --batch-size 64 --out ifeval-dpo-10-12-mix > ifeval.log 2> ifeval.err
echo CHAIN_DONE
