#!/bin/bash
# Uniform-width builds with GPTQ indices (recovery-text calibration, 32,768 tokens), no recovery: perplexity.
cd /work/runs/s48
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
for B in 2 4; do
  python /work/dev/benchmarks/palettize_uniform.py --bits $B --calibration mix/recovery_mix_text.txt --out pal$B-gptq > pal$B-gptq.log 2>&1
  ./ppl.sh /work/runs/s48/pal$B-gptq pal${B}_gptq
done
echo UNIFORM_DONE
