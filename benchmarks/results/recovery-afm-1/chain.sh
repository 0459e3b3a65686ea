#!/bin/bash
# recovery-afm-1, unattended: text, distillation, the rule's measurements, the decision, then IFEval if it ships.
set -e
cd /work/runs/recafm
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
R=/work/dev/benchmarks/results/recovery-afm-1
DEV=/work/dev/benchmarks/results/edit-data-1/dev64-prompts.jsonl
[ -f prompts_20k.jsonl ] || afmkit posttrain synth-if --n 20000 --seed 0 --out prompts_20k.jsonl > synth.log 2>&1
python - <<'PY'
import json
rows = [json.loads(l) for l in open("prompts_20k.jsonl")]
train = [r for r in rows if r.get("split", "train") == "train"][5000:5400]
open("chat_prompts.jsonl", "w").writelines(json.dumps(r) + "\n" for r in train)
PY
[ -f afm-answers/responses.jsonl ] || afmkit eval ifeval --model smollm2-135m-afm --input chat_prompts.jsonl --max-new-tokens 384 --batch-size 64 --out afm-answers > answers.log 2> answers.err
python $R/make_text.py prompts_20k.jsonl afm-answers text.txt > text.log
RES=""; [ -d rec.run ] && RES=--resume
afmkit compress recover --model smollm2-135m-afm-3.5bpw --teacher smollm2-135m-afm --init-from-recovery \
  --data text.txt --steps 300 --batch 4 --seq-len 256 --lr 5e-4 --save-every 25 --out rec $RES > train.log 2> train.err
echo TRAIN_DONE
[ -f dev64-stack/results.json ] || afmkit eval ifeval --model smollm2-135m-afm-3.5bpw --input $DEV --max-new-tokens 512 --batch-size 64 --out dev64-stack > dev64-stack.log 2> dev64-stack.err
[ -f dev64-new/results.json ] || afmkit eval ifeval --model smollm2-135m-instruct-3.5bpw --no-recovery --adapter rec --input $DEV --max-new-tokens 512 --batch-size 64 --out dev64-new > dev64-new.log 2> dev64-new.err
: > perplexity.log
for T in /work/shared/data/pretrain/tinyshakespeare_input.txt /work/runs/dpo12/harmless_c.txt; do
  echo "new $(basename $T) $(afmkit eval perplexity --model smollm2-135m-instruct-3.5bpw --no-recovery --adapter rec --text $T --max-chars 20000 --json 2>/dev/null)" >> perplexity.log
done
python $R/decide.py . > decision.json
cat decision.json
echo DECIDED
if python -c "import json,sys; sys.exit(0 if json.load(open('decision.json'))['ship'] else 1)"; then
  afmkit eval ifeval --model smollm2-135m-instruct-3.5bpw --no-recovery --adapter rec --max-new-tokens 1024 --batch-size 64 --out ifeval-new > ifeval.log 2> ifeval.err
fi
echo CHAIN_DONE
