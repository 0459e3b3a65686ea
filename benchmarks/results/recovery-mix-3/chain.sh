#!/bin/bash
# recovery-mix-3 (README.md): the shipped recovery adapter continued on recovery-mix-2's dialogue text
# interleaved with unread Shakespeare prose. Every step skips what it finished, the training resumes.
cd /work/runs/s55/recmix3
. /work/main/.venv/bin/activate
export AFMKIT_SHARED_DATA=/work/shared/data PYTHONPATH=/work/dev/src
R=/work/dev/benchmarks/results
M=smollm2-135m-instruct-3.5bpw
SH=$AFMKIT_SHARED_DATA/pretrain/tinyshakespeare_input.txt
HC=/work/runs/dpo12/harmless_c.txt
DEV=$R/edit-data-1/dev64-prompts.jsonl
# 1. the shipped adapter on this CPU, in this chain: the rule's baseline
[ -s base_ppl.jsonl ] || { afmkit eval perplexity --model $M --text $SH --max-chars 20000 --json 2>/dev/null | tail -1 > base_ppl.tmp &&
  afmkit eval perplexity --model $M --text $HC --max-chars 20000 --json 2>/dev/null | tail -1 >> base_ppl.tmp && mv base_ppl.tmp base_ppl.jsonl; }
[ -s dev64-base/results.json ] || afmkit eval ifeval --model $M --input $DEV --max-new-tokens 512 --batch-size 64 --out dev64-base > dev64-base.log 2>&1
# 2. the text: recovery-mix-2's (remade by its own steps into mix2/ if its folder is gone), then the interleaving
if [ ! -s steps.txt ]; then
  MIX2=/work/runs/s54/recmix2
  if [ ! -s $MIX2/data_start.txt ]; then
    MIX2=$PWD/mix2 && mkdir -p mix2 && cd mix2
    [ -s prompts_20k.jsonl ] || afmkit posttrain synth-if --n 20000 --seed 0 --out prompts_20k.jsonl > synth.log 2>&1
    python -c "import json; rows=[json.loads(l) for l in open('prompts_20k.jsonl')]; train=[r for r in rows if r.get('split','train')=='train'][5000:5800]; open('recovery_chat_prompts.jsonl','w').writelines(json.dumps(r)+'\n' for r in train)"
    [ -s teacher-answers/responses.jsonl ] || afmkit eval ifeval --model smollm2-135m-instruct --input recovery_chat_prompts.jsonl \
      --max-new-tokens 384 --batch-size 64 --out teacher-answers > teacher.log 2>&1
    python $R/recovery-mix-2/make_text.py $AFMKIT_SHARED_DATA > text.log 2>&1
    cd ..
  fi
  python $R/recovery-mix-3/make_text.py $AFMKIT_SHARED_DATA $MIX2/recovery_mix_text.txt $MIX2/data_start.txt > text.log 2>&1 || exit 1
fi
# 3. the continuation: one pass over the text
RES=""; [ -d rec.run/checkpoints ] && RES="--resume"
afmkit compress recover --model $M --init-from-recovery --data recovery_mix3_text.txt \
  --steps $(cat steps.txt) --batch 4 --seq-len 256 --lr 5e-4 --save-every 20 --out rec $RES > recover.log 2>&1 || exit 1
# 4. the same measures for it, then the rule (recovery-mix-2's decide.py)
[ -s new_ppl.jsonl ] || { afmkit eval perplexity --model $M --no-recovery --adapter rec --text $SH --max-chars 20000 --json 2>/dev/null | tail -1 > new_ppl.tmp &&
  afmkit eval perplexity --model $M --no-recovery --adapter rec --text $HC --max-chars 20000 --json 2>/dev/null | tail -1 >> new_ppl.tmp && mv new_ppl.tmp new_ppl.jsonl; }
[ -s dev64-new/results.json ] || afmkit eval ifeval --model $M --no-recovery --adapter rec --input $DEV --max-new-tokens 512 --batch-size 64 --out dev64-new > dev64-new.log 2>&1
python $R/recovery-mix-2/decide.py && { [ -s ifeval/results.json ] || afmkit eval ifeval --model $M --no-recovery --adapter rec \
  --max-new-tokens 1024 --batch-size 64 --out ifeval > ifeval.log 2>&1; }
echo CHAIN_DONE
