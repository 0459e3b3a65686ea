#!/bin/bash
# Issue 13's speed targets, main against this session's tree with the int4 kernel on AMX too (with the row-kernel fix), round robin
# on one quiet machine: python benchmarks/generation.py, 2 threads per engine, medians of 3.
PY=/work/main/.venv/bin/python
run() {  # tree engines
  PYTHONPATH=/work/$1/src:/work/$1/benchmarks $PY /work/$1/benchmarks/generation.py --engines $2 \
    --palettized-model smollm2-135m-instruct-3.5bpw --repeats 3 --wait-quiet 60 --json 2>>err.log \
    | grep '^{' | sed "s/^{/{\"tree\": \"$1\", \"round\": $3, /" >> results.jsonl
}
run dev afmkit-3.5bpw,afmkit-int4,llama.cpp,transformers 1
run main afmkit-int4,afmkit-3.5bpw 1
run dev afmkit-3.5bpw,afmkit-int4 2
run main afmkit-3.5bpw,afmkit-int4,llama.cpp,transformers 2
echo ALL_DONE >> err.log
