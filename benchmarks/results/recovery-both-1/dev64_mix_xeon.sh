#!/bin/bash
# The dev64 half of benchmarks/results/recovery-both-1/xeon_mix.sh (its perplexity half is recorded), after the mix chain.
cd /work/runs/recboth
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data
until grep -q CHAIN_DONE /work/runs/mix1012/chain.out 2>/dev/null; do sleep 20; done
afmkit eval ifeval --model smollm2-135m-instruct-3.5bpw --input /work/main/benchmarks/results/edit-data-1/dev64-prompts.jsonl --max-new-tokens 512 --batch-size 64 --out dev64-mix-xeon > dev64-mix.log 2> dev64-mix.err
echo XEON_DONE
