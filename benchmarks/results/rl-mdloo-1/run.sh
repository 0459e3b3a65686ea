#!/bin/bash
cd /work/runs/s23
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/runs/s23/srcsnap/ AFMKIT_SHARED_DATA=/work/shared/data
A() { python -c "import sys; from afmkit.cli import main; sys.argv[0]='afmkit'; sys.exit(main())" "$@"; }
R3=/work/main/benchmarks/results/itec-round3/adapter
RES=""; [ -d rl2/checkpoints ] && RES="--resume"
A posttrain rl --algo mdloo --init-adapter $R3 --prompts /work/runs/s21/prompts_20k.jsonl --out rl2 \
  --k 4 --prompts-per-iteration 8 --inner-steps 2 --lr 1e-5 --beta 0.05 --max-new-tokens 384 \
  --unfinished-reward 0 --iterations 40 --dev-prompts 32 --dev-every 5 --train-batch 2 $RES >> rl2.log 2>&1
echo done >> rl2.log
