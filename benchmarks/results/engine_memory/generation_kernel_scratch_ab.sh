#!/usr/bin/env bash
# The kernels' per-call buffers (old: main's kernels; new: per-thread scratch), each with glibc's
# default malloc and with AFMKIT_MALLOC=return-freed; two alternating rounds, one quiet machine.
set -u
cd /work/runs/ab41
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data AFMKIT_NO_XLA_CACHE=1
for round in 1 2; do
  for tree in main dev; do
    for malloc in default return-freed; do
      echo "round $round $tree $malloc $(date +%T)" >&2
      PYTHONPATH=/work/$tree/src AFMKIT_MALLOC=$malloc python /work/dev/benchmarks/generation.py \
        --engines afmkit-int4,afmkit-3.5bpw --palettized-model smollm2-135m-instruct-3.5bpw --json --repeats 3 \
        | sed "s/^{/{\"tree\": \"$tree\", \"malloc\": \"$malloc\", \"round\": $round, /" >> ab.jsonl
    done
  done
done
