#!/bin/bash
# The shipped recovery (recovery-mix-1) measured on this CPU, for context only (the rule compares with its committed numbers).
cd /work/runs/recboth
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data
M=smollm2-135m-instruct-3.5bpw
afmkit eval perplexity --model $M --text /work/shared/data/pretrain/tinyshakespeare_input.txt --max-chars 20000 --json > mix_ppl_shakespeare.log 2>/dev/null
afmkit eval perplexity --model $M --text /work/runs/dpo10/harmless_c.txt --max-chars 20000 --json > mix_ppl_harmless.log 2>/dev/null
afmkit eval ifeval --model $M --input /work/main/benchmarks/results/edit-data-1/dev64-prompts.jsonl --max-new-tokens 512 --batch-size 64 --out dev64-mix-xeon > dev64-mix.log 2> dev64-mix.err
echo XEON_DONE
