"""The distillation text of recovery-afm-1: the shipped recovery text's recipe, with the
post-trained model's own chat answers in place of the float base's.

python make_text.py PROMPTS_20K ANSWERS_DIR OUT_TXT
  PROMPTS_20K: `afmkit posttrain synth-if --n 20000 --seed 0` (train rows 5,000-5,399 were answered)
  ANSWERS_DIR: `afmkit eval ifeval --model smollm2-135m-afm --input chat_prompts.jsonl --max-new-tokens 384`

Generic text (tiny shakespeare from character 600,000 interleaved with hh-rlhf helpful-base test
dialogues, 4,000 characters at a time), then whole chat transcripts up to 2,000 characters,
repeated until the chats run out; the generic text past that point is left out, so the chats
spread over the whole text. Never tiny shakespeare's first 100,000 characters, IFEval or LIMA.
"""

import json
import os
import sys
from pathlib import Path

import afmkit

shared = os.environ.get("AFMKIT_SHARED_DATA", "../shared/data")
answers_dir, out_path = sys.argv[2], sys.argv[3]
sh = Path(f"{shared}/pretrain/tinyshakespeare_input.txt").read_text()[600000:]
hh = [
    json.loads(line)["chosen"].strip()
    for line in Path(f"{shared}/preference/hh-rlhf_helpful-base_test.jsonl").read_text().splitlines()
]
tok = afmkit.load("smollm2-135m-instruct").tokenizer
chats = []
for line in Path(f"{answers_dir}/responses.jsonl").read_text().splitlines():
    r = json.loads(line)
    head = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
    chats.append(head + r["response"] + "<|im_end|>\n")
out, i, j, c = [], 0, 0, 0
while c < len(chats):
    if i < len(sh):
        out.append(sh[i : i + 4000] + "\n\n")
        i += 4000
    buf = []
    while j < len(hh) and sum(map(len, buf)) < 4000:
        buf.append(hh[j])
        j += 1
    if buf:
        out.append("\n\n".join(buf) + "\n\n")
    n = 0
    while c < len(chats) and n < 2000:
        out.append(chats[c])
        n += len(chats[c])
        c += 1
text = "".join(out)
Path(out_path).write_text(text)
print(f"{len(text):,} characters, {len(chats)} chats, shakespeare to {600000 + i:,}, {j} hh dialogues")
