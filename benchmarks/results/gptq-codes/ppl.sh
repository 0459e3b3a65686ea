#!/bin/bash
# usage: ppl.sh MODEL TAG [extra args]
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
M=$1; T=$2; shift 2
cd /work/runs/s48
afmkit eval perplexity --model $M --text /work/shared/data/pretrain/tinyshakespeare_input.txt --max-chars 20000 --json "$@" > ppl_${T}_shakespeare.json 2> ppl_${T}.err
afmkit eval perplexity --model $M --text /work/runs/dpo12/harmless_c.txt --max-chars 20000 --json "$@" > ppl_${T}_harmless.json 2>> ppl_${T}.err
python -c "import json;print('$T', [round(json.load(open(f'ppl_${T}_{x}.json'))['perplexity'],3) for x in ('shakespeare','harmless')])"
