#!/bin/bash
# main's tree and this tree in turn, two rounds; one JSON line each into batch_ab.jsonl.
# Usage (from the repository root of this tree): bash benchmarks/results/amx-thresholds/batch_ab.sh MAIN_TREE
here=benchmarks/results/amx-thresholds
for round in 1 2; do
  for tree in $1 $PWD; do
    PYTHONPATH=$tree/src ${PYTHON:-python} $here/batch_ab.py $(basename $tree) 2>/dev/null | tail -1 | sed "s/^{/{\"round\": $round, /" >> $here/batch_ab.jsonl
  done
done
