#!/usr/bin/env bash
# Rebuild the adapter afmkit ships as `smollm2-135m-afm` (rl-mdloo-7) from the base model, step by step.
#
#   examples/smollm2_135m_afm/reproduce.sh OUT_DIR            # the recipe as run (hours on 2 cores)
#   SMOKE=1 examples/smollm2_135m_afm/reproduce.sh OUT_DIR    # every step at a tiny size (minutes)
#
# Each step writes into OUT_DIR and leaves a `.done-STEP` marker; a rerun skips finished steps,
# so a killed run goes on where it stopped (a stopped DPO or RL run with --resume; iTeC, edit-data
# and loop-cut reuse what they saved). The helper scripts are the runs' own, committed
# beside their results in benchmarks/results/. See this folder's README.md for what each step
# does, its data and its compute.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS=$REPO/benchmarks/results
OUT=${1:?usage: reproduce.sh OUT_DIR}
mkdir -p "$OUT"
cd "$OUT"

if [[ "${SMOKE:-0}" == 1 ]]; then
  # every command and file hand-off of the recipe, at sizes that run in minutes: not a model
  ITEC="--train-prompts 24 --samples 2 --max-new-tokens 160 --sft-steps 2 --dev-prompts 2 --batch 24"
  EDIT="--tasks 6 --max-new-tokens 192 --batch 16"
  LOOPCUT="--prompts-limit 16 --max-new-tokens 96 --batch 16"
  DPO2="--steps 2 --save-every 2"; DPO4="--steps 2 --save-every 2"; DPO5="--steps 2 --save-every 2"
  EDIT_LF="--tasks 16 --max-new-tokens 384 --batch 16"; PAIRS8=40
  LOOPCUT_LF="--prompts-limit 16 --max-new-tokens 96 --batch 16"; DPO10="--steps 2 --save-every 2"
  RL="--iterations 2 --prompts-per-iteration 2 --k 2 --inner-steps 1 --max-new-tokens 32 --dev-prompts 2 --dev-every 1"
  RL3="--iterations 4"
  IFEVAL="--limit 8 --max-new-tokens 64 --batch-size 8"
  DPO_COMMON="--beta 0.1 --nll-weight 1 --warmup 3 --batch 2 --accum 2 --seq-len 512"  # a quarter of the memory
else
  ITEC="--train-prompts 350 --samples 2 --max-new-tokens 384 --sft-steps 40 --batch 64"
  EDIT="--tasks 800"
  LOOPCUT="--prompts-limit 320 --max-new-tokens 768"
  DPO2="--steps 52 --lr 5e-5 --save-every 13 --eval-fraction 0.04"
  DPO4="--steps 85 --lr 1e-4 --save-every 20"
  DPO5="--steps 70 --lr 1e-4 --save-every 20"
  EDIT_LF="--tasks 640 --max-new-tokens 512"; PAIRS8=600
  LOOPCUT_LF="--prompts-limit 480 --max-new-tokens 512"; DPO10="--steps 90 --lr 5e-5 --save-every 30"
  RL="--iterations 40 --prompts-per-iteration 8 --k 4 --inner-steps 2 --max-new-tokens 384 --dev-prompts 32 --dev-every 5"
  RL3="--iterations 80"
  IFEVAL="--max-new-tokens 1024 --batch-size 64"
  DPO_COMMON="--beta 0.1 --nll-weight 1 --warmup 3 --batch 4 --accum 2 --seq-len 1024"
fi

step() {  # step NAME COMMAND...: run COMMAND unless NAME finished before
  local name=$1
  shift
  if [[ -e ".done-$name" ]]; then
    echo "== $name: done before, skipped"
    return
  fi
  echo "== $name ($(date -u +%H:%M:%S))"
  SECONDS=0
  "$@"
  echo "$SECONDS" > ".done-$name"
  echo "== $name: ${SECONDS} s"
}

dpo() {  # posttrain dpo, continued with --resume when an earlier try of this step was stopped
  local out=$1
  shift
  local resume=()
  [[ -f "$out/training/settings.json" ]] && resume=(--resume)
  afmkit posttrain dpo --out "$out" "$@" "${resume[@]}"
}

# 1. Prompts. synth-if's seed-0 file of 5,000; iTeC rounds 1 and 2 (not in this lineage) used its
#    first 450 train prompts, so round 3 took the rest. The 20,000-prompt file (the same first
#    4,500 train prompts, more of each task) feeds the editor data.
split_round3_prompts() {
  python - <<'PY'
import json
rows = [json.loads(line) for line in open("prompts.jsonl")]
train = [r for r in rows if r["split"] == "train"][450:]
with open("prompts_r3.jsonl", "w") as f:
    for r in train + [r for r in rows if r["split"] == "dev"]:
        f.write(json.dumps(r) + "\n")
PY
}
step prompts afmkit posttrain synth-if --n 5000 --seed 0 --out prompts.jsonl
step prompts_r3 split_round3_prompts
step prompts_20k afmkit posttrain synth-if --n 20000 --seed 0 --out prompts_20k.jsonl

# 2. iTeC with the constraint editor in the committee: the base samples, the editor rewrites, the
#    best answer per prompt wins, SFT of a fresh rank-16 LoRA on the winners ("Third iTeC round").
# shellcheck disable=SC2086
step itec afmkit posttrain itec --model smollm2-135m-instruct --committee base --edit \
  --prompts prompts_r3.jsonl $ITEC --out itec3
ROUND3=itec3/round-01/adapter

# 3. Editor data: the base answers each of the first 800 train tasks once (sampled), trimmed to
#    80 words; the editor rewrites it for every prompt of its task ("Editor data at scale").
# shellcheck disable=SC2086
step edit_data afmkit posttrain edit-data --prompts prompts_20k.jsonl $EDIT --max-words 80 --out ed80.jsonl

# 4. dpo-2: rewrites preferred to their originals, and unasked forms rejected, from round 3.
make_pairs_2() { python "$RESULTS/dpo-2/make_pairs.py" prompts_20k.jsonl ed80.jsonl > pairs2.jsonl; }
step pairs2 make_pairs_2
# shellcheck disable=SC2086
step dpo2 dpo dpo-2 --data pairs2.jsonl --init-adapter "$ROUND3" $DPO_COMMON $DPO2

# 5. dpo-4: added-form pairs on the same editor data, from dpo-2.
make_pairs_4() { python "$RESULTS/dpo-4/make_pairs.py" prompts_20k.jsonl ed80.jsonl ed80.answers.jsonl > pairs4.jsonl; }
step pairs4 make_pairs_4
# shellcheck disable=SC2086
step dpo4 dpo dpo-4 --data pairs4.jsonl --init-adapter dpo-2 $DPO_COMMON $DPO4

# 6. dpo-5: dpo-4's greedy loops cut and continued without the loop, plus dpo-4's pairs, from dpo-4.
# shellcheck disable=SC2086
step loop_cut afmkit posttrain loop-cut --prompts prompts_20k.jsonl --adapter dpo-4 $LOOPCUT --out lc5/loopcut.jsonl
continue_loops() { python "$RESULTS/dpo-5/continue_loops.py" dpo-4 prompts_20k.jsonl lc5/loopcut.jsonl > loop_pairs.jsonl; }
step continue_loops continue_loops
make_pairs_5() {
  gzip -kf pairs4.jsonl
  python "$RESULTS/dpo-5/make_pairs.py" prompts_20k.jsonl ed80.jsonl ed80.answers.jsonl pairs4.jsonl.gz \
    loop_pairs.jsonl > pairs5.jsonl
}
step pairs5 make_pairs_5
# shellcheck disable=SC2086
step dpo5 dpo dpo-5 --data pairs5.jsonl --init-adapter dpo-4 $DPO_COMMON $DPO5

# 7. dpo-9's pairs: long-form writing pairs (dpo-8's) and greedy loop-cut pairs.
step prompts_lf afmkit posttrain synth-if --frame writing --n 10000 --seed 0 --out longform_10k.jsonl
# shellcheck disable=SC2086
step edit_lf afmkit posttrain edit-data --adapter dpo-5 --prompts longform_10k.jsonl $EDIT_LF --out lf_pairs.jsonl
select_pairs_8() { python "$RESULTS/dpo-8/select_pairs.py" longform_10k.jsonl lf_pairs.jsonl "$PAIRS8" 0 > pairs8.jsonl; }
step pairs8 select_pairs_8
split_lf_rest() {  # long-form train prompts of the questions edit-data did not answer
  python - <<'PY'
import json
used = {json.loads(line)["task_source"] for line in open("lf_pairs.answers.jsonl")}
with open("lf_rest.jsonl", "w") as f:
    for line in open("longform_10k.jsonl"):
        row = json.loads(line)
        if row["split"] == "train" and row["task_source"] not in used:
            f.write(line)
PY
}
step lf_rest split_lf_rest
# shellcheck disable=SC2086
step loop_cut_lf afmkit posttrain loop-cut --adapter dpo-5 --prompts lf_rest.jsonl $LOOPCUT_LF --out lc9/loopcut.jsonl
make_pairs_9() { python "$RESULTS/dpo-9/make_pairs.py" pairs8.jsonl lc9/loopcut.jsonl 9 > pairs9.jsonl; }
step pairs9 make_pairs_9

# 8. dpo-10: dpo-9's run (DPO from dpo-5 on those pairs at half the LR) plus a KL anchor to the
#    base on plain text, tiny shakespeare from character 400,000 (benchmarks/results/dpo-10/).
anchor_text() {
  python -c "import sys; from afmkit.files import shared_data_dir
t = (shared_data_dir() / 'pretrain' / 'tinyshakespeare_input.txt').read_text(); sys.stdout.write(t[400000:])" > anchor.txt
}
step anchor anchor_text
# shellcheck disable=SC2086
step dpo10 dpo dpo-10 --data pairs9.jsonl --init-adapter dpo-5 $DPO_COMMON $DPO10 \
  --anchor-text anchor.txt --anchor-weight 10 --anchor-len 256

# 9. rl-mdloo-2: MDLOO from dpo-10 (also the reference policy) on synth-if seed 50's train prompts
#    without the questions of the two dev splits, longform-dev and dev200 (benchmarks/results/rl-mdloo-2/).
rl_prompts() {
  afmkit posttrain synth-if --n 4000 --seed 50 --out prompts_s50.jsonl
  python "$RESULTS/dpo-11/filter_prompts.py" prompts_s50.jsonl "$RESULTS/longform-dev/longform_dev.jsonl" \
    "$RESULTS/dpo-4/dev200.jsonl" > prompts_rl.jsonl
  grep '"split": "dev"' prompts_s50.jsonl >> prompts_rl.jsonl
}
step prompts_rl rl_prompts
rl() {  # rl OUT INIT PROMPTS [FLAGS...]: posttrain rl, continued with --resume when OUT has checkpoints
  local out=$1 init=$2 prompts=$3
  shift 3
  local resume=()
  [[ -d "$out/checkpoints" ]] && resume=(--resume)
  # shellcheck disable=SC2086
  afmkit posttrain rl --algo mdloo --init-adapter "$init" --prompts "$prompts" --out "$out" \
    --lr 2e-5 --beta 0.05 --unfinished-reward 0 --train-batch 2 $RL "$@" "${resume[@]}"
}
step rl rl rl-mdloo-2 dpo-10 prompts_rl.jsonl

# 10. rl-mdloo-3: rl-mdloo-2's run continued to twice its iterations from its last checkpoint
#     (optimizer state included), nothing else changed (benchmarks/results/rl-mdloo-3/).
continue_rl() {
  if [[ ! -d rl-mdloo-3 ]]; then
    rm -rf rl-mdloo-3.tmp
    cp -r rl-mdloo-2 rl-mdloo-3.tmp
    mv rl-mdloo-3.tmp rl-mdloo-3
  fi
  # shellcheck disable=SC2086
  rl rl-mdloo-3 dpo-10 prompts_rl.jsonl $RL3
}
step rl3 continue_rl

# 11. rl-mdloo-5: MDLOO from rl-mdloo-3 (now also the reference policy) on
#     long-form writing prompts, synth-if --frame writing seed 53, without the dev splits'
#     questions (benchmarks/results/rl-mdloo-5/).
rl5_prompts() {
  afmkit posttrain synth-if --frame writing --n 4000 --seed 53 --out prompts_s53.jsonl
  python "$RESULTS/dpo-11/filter_prompts.py" prompts_s53.jsonl "$RESULTS/longform-dev/longform_dev.jsonl" \
    "$RESULTS/dpo-4/dev200.jsonl" > prompts_rl5.jsonl
  grep '"split": "dev"' prompts_s53.jsonl >> prompts_rl5.jsonl
}
step prompts_rl5 rl5_prompts
step rl5 rl rl-mdloo-5 rl-mdloo-3/adapter prompts_rl5.jsonl

# 12. The shipped adapter, rl-mdloo-7: MDLOO from rl-mdloo-5 (now the reference) on writing prompts
#     of a fresh seed (54), every other one asking for another language or for capitals, the
#     constraints whose answers ran out of tokens (benchmarks/results/rl-mdloo-7/).
rl7_prompts() {
  afmkit posttrain synth-if --frame writing --n 6000 --seed 54 --out prompts_s54.jsonl
  python "$RESULTS/dpo-11/filter_prompts.py" prompts_s54.jsonl "$RESULTS/longform-dev/longform_dev.jsonl" \
    "$RESULTS/dpo-4/dev200.jsonl" > filtered_s54.jsonl
  python "$RESULTS/rl-mdloo-7/focus_prompts.py" prompts_s54.jsonl filtered_s54.jsonl > prompts_rl7.jsonl
}
step prompts_rl7 rl7_prompts
step rl7 rl rl-mdloo-7 rl-mdloo-5/adapter prompts_rl7.jsonl
SHIPPED=rl-mdloo-7/adapter

# 13. The final measurement (never used to choose anything): IFEval, greedy, int4.
# shellcheck disable=SC2086
step ifeval_shipped afmkit eval ifeval --adapter "$SHIPPED" $IFEVAL --out ifeval-smollm2-135m-afm
echo "the adapter: $OUT/$SHIPPED (use it with --adapter)"
