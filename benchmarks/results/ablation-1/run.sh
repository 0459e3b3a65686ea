#!/usr/bin/env bash
# The equal-compute ablation of issue 12 (README.md here): five arms from the same base, each
# scored on dev200 right after it trains. Run from an empty folder; every step is skipped when its
# output exists, so rerunning the script resumes it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
P=prompts_2k.jsonl
[ -s $P ] || afmkit posttrain synth-if --n 2000 --seed 0 --out $P
[ -s dev200.jsonl ] || grep '"split": "dev"' $P > dev200.jsonl
[ -s sft_selfinstruct.jsonl ] || python "$HERE/make_sft_data.py" $P sft_selfinstruct.jsonl
COMMON_SAMPLING="--max-new-tokens 256 --temperature 1 --top-p 1"
score() {  # score NAME [--adapter DIR]
  local name=$1; shift
  [ -s eval-$name/results.json ] || /usr/bin/time -v -o eval-$name.time \
    afmkit eval ifeval --input dev200.jsonl --max-new-tokens 256 --batch-size 64 --out eval-$name "$@"
}
score base
[ -s sft/adapter_config.json ] || /usr/bin/time -v -o sft.time afmkit posttrain sft --data sft_selfinstruct.jsonl \
  --out sft --steps 16 --warmup 2 --save-every 16
score sft --adapter sft
[ -s rs/round-01/round.json ] || /usr/bin/time -v -o rs.time \
  afmkit posttrain itec --committee base --prompts $P --out rs --samples 4 --rounds 1 --train-prompts 32 \
  --dev-prompts 1 --sft-steps 16 $COMMON_SAMPLING
score rs --adapter rs/round-01/adapter
for algo in rloo mdloo ppo-clip; do
  [ -s $algo/adapter/adapter_config.json ] || /usr/bin/time -v -o $algo.time afmkit posttrain rl --algo $algo \
    --prompts $P --out $algo --iterations 4 --prompts-per-iteration 8 --k 4 $COMMON_SAMPLING \
    --unfinished-reward 0 --dev-every 0
  score $algo --adapter $algo/adapter
done
