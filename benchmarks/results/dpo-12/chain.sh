#!/bin/bash
# dpo-12 (benchmarks/results/dpo-12/README.md): train, longform-dev, the perplexity guards; IFEval once DECIDED exists.
cd /work/runs/dpo12
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data
R=/work/main/benchmarks/results
RESUME=""
[ -f adapter/training/settings.json ] && RESUME="--resume"
if [ ! -f TRAIN_DONE ]; then
  afmkit posttrain dpo --data data.jsonl --init-adapter $R/dpo-10/adapter --out adapter \
    --lr 5e-5 --beta 0.1 --nll-weight 1 --replay-weight 1 --steps 36 --warmup 3 --batch 4 --accum 2 \
    --seq-len 1024 --save-every 5 --anchor-text anchor.txt --anchor-weight 10 --anchor-len 256 $RESUME > train.log 2> train.err || exit 1
  touch TRAIN_DONE
fi
[ -f longform-dpo12/results.json ] || afmkit eval ifeval --input $R/longform-dev/longform_dev.jsonl --adapter adapter \
  --max-new-tokens 512 --batch-size 64 --out longform-dpo12 > longform.log 2> longform.err || exit 1
if [ ! -f GUARDS_DONE ]; then
  : > perplexity.log
  for T in shakespeare_dev.txt harmless_c.txt; do
    echo "$T dpo12 $(afmkit eval perplexity --text $T --max-chars 20000 --adapter adapter --json 2>/dev/null)" >> perplexity.log
  done
  touch GUARDS_DONE
fi
while [ ! -f DECIDED ]; do sleep 20; done
afmkit eval ifeval --adapter adapter --max-new-tokens 1024 --batch-size 64 --out ifeval-dpo-12 > ifeval.log 2> ifeval.err
echo CHAIN_DONE
