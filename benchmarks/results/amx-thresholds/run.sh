#!/bin/bash
# Builds copies of src/ with other row thresholds, then runs sweep.py for each, twice, in
# opposite orders (the machine's speed drifts), one JSON line each into results.jsonl.
# Usage (from the repository root): bash benchmarks/results/amx-thresholds/run.sh
set -e
here=benchmarks/results/amx-thresholds
python=${PYTHON:-python}
variants=()
for n in 1 2 4 8; do
  dir=/tmp/afmkit-threshold/palettized-$n
  rm -rf $dir && mkdir -p $dir && cp -r src $dir/
  sed -i "s/constexpr int64_t kDirectRows = 4;/constexpr int64_t kDirectRows = $n;/" $dir/src/afmkit/kernels/palettized_kernels.cc
  grep -q "kDirectRows = $n;" $dir/src/afmkit/kernels/palettized_kernels.cc
  variants+=("palettized $n $dir")
done
for n in 2 4 8 16; do
  dir=/tmp/afmkit-threshold/int4-$n
  rm -rf $dir && mkdir -p $dir && cp -r src $dir/
  sed -i "s/constexpr int64_t kAmxRows = 16;/constexpr int64_t kAmxRows = $n;/" $dir/src/afmkit/kernels/cpu_kernels.cc
  grep -q "kAmxRows = $n;" $dir/src/afmkit/kernels/cpu_kernels.cc
  variants+=("int4 $n $dir")
done
for round in 1 2; do
  if [ $round = 2 ]; then order=$(seq $((${#variants[@]} - 1)) -1 0); else order=$(seq 0 $((${#variants[@]} - 1))); fi
  for i in $order; do
    set -- ${variants[$i]}
    PYTHONPATH=$3/src $python $here/sweep.py $1 $2 | tail -1 | sed "s/^{/{\"round\": $round, /" >> $here/results.jsonl
  done
done
