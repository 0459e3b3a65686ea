#!/bin/bash
# Device call 1: the first half of the GGUF to /tmp, wheels, environment, trainer GPU==CPU, MFU.
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
mkdir -p /tmp/keep && cp .gpu/part_a /tmp/keep/part_a
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl > $OUT/pip.log 2>&1 || echo "PIP FAILED"
export PYTHONPATH=$PWD/src:/tmp/site JAX_PLATFORMS=cuda,cpu AFMKIT_CACHE=/tmp/afmkit_cache XLA_PYTHON_CLIENT_PREALLOCATE=false
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc
  python3 -c "import jax, jaxlib, optax, orbax.checkpoint, tokenizers, torch, transformers; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__, 'tokenizers', tokenizers.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import if_verifiable, gguf, afmkit, afmkit.posttrain.rl, afmkit.infer.engine; print('imports ok')"; } 2>&1 | tee $OUT/env.log
echo "== trainer"; date
timeout 150 python3 -m pytest tests/train/test_objectives_gpu.py -q -rA -p no:cacheprovider > $OUT/trainer_gpu.log 2>&1; echo "pytest rc $?"; tail -15 $OUT/trainer_gpu.log
echo "== mfu"; date
for e in afmkit torch; do
  timeout 100 python3 benchmarks/train.py --size bench-1b --compute-dtype bfloat16 --batch 8 --seq-len 2048 --engines $e --rounds 2 --steps 4 --warmup 2 > $OUT/train_h200_$e.json 2> $OUT/train_h200_$e.err; echo "$e rc $?"; cat $OUT/train_h200_$e.json; tail -3 $OUT/train_h200_$e.err
done
date
