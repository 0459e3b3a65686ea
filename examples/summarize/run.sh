#!/usr/bin/env bash
# Train the summarization adapter for SmolLM2-135M-Instruct on CPU, then serve it.
# Usage: bash examples/summarize/run.sh   (from the repository root)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python "$here/make_data.py" --out "$here/data"
afmkit adapter train \
  --model smollm2-135m-instruct \
  --data "$here/data/train.jsonl" \
  --out "$here/data/adapters/summarize" \
  --rank 16 --alpha 32 --targets q,k,v,o,gate,up,down \
  --steps 60 --batch 4 --lr 5e-4 --save-every 20 --eval-fraction 0.1
echo "serve it with: afmkit serve --adapters $here/data/adapters   (model name smollm2-135m-instruct:summarize)"
