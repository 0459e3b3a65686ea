#!/bin/bash
cd /work/runs/s22
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/runs/s22/srcsnap/ AFMKIT_SHARED_DATA=/work/shared/data
A() { python -c "import sys; from afmkit.cli import main; sys.argv[0]='afmkit'; sys.exit(main())" "$@"; }
R3=/work/main/benchmarks/results/itec-round3/adapter
A posttrain loop-cut --adapter $R3 --prompts /work/runs/s21/prompts_20k.jsonl --out ul2/loopcut.jsonl --prompts-limit 512 --quiet > ul2/loopcut.log 2>&1
A posttrain sft --data ul2/loopcut.jsonl --init-adapter $R3 --unlikelihood 0.2 --out ul2/sft --steps 30 --lr 2e-4 --warmup 3 --batch 8 --accum 2 --save-every 10 --quiet > ul2/sft.log 2>&1
for t in /work/shared/data/pretrain/tinyshakespeare_input.txt /work/runs/s21/harmless_text.txt; do
  echo "$t $(A eval perplexity --text $t --max-chars 20000 --adapter ul2/sft --json 2>/dev/null | tail -1)" >> ul2/ppl.log
done
A eval ifeval --input dev64.jsonl --adapter ul2/sft --max-new-tokens 512 --batch-size 64 --out ul2/dev > ul2/dev.log 2>&1
echo done >> ul2/dev.log
