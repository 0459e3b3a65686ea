"""recovery-mix-2's text: the shipped recovery adapter's text, made by the recipe in
src/afmkit/resources/smollm2_135m_instruct_3_5bpw/README.md from the teacher's answers in
teacher-answers/, written to recovery_mix_text.txt; and the character at which the shipped run's
500 steps of 4 x 256 tokens ended (its 512,000th token), written to data_start.txt.

    python make_text.py SHARED_DATA_DIR
"""

import json
import sys
from pathlib import Path

import afmkit

shared = Path(sys.argv[1])
sh = (shared / "pretrain" / "tinyshakespeare_input.txt").read_text()[600000:]
with open(shared / "preference" / "hh-rlhf_helpful-base_test.jsonl") as f:
    hh = [json.loads(line)["chosen"].strip() for line in f]
generic, i, j = [], 0, 0
while i < len(sh) or j < len(hh):
    if i < len(sh):
        generic.append(sh[i : i + 4000])
        i += 4000
    buf = []
    while j < len(hh) and sum(map(len, buf)) < 4000:
        buf.append(hh[j])
        j += 1
    if buf:
        generic.append("\n\n".join(buf))
tok = afmkit.load("smollm2-135m-instruct").tokenizer
chats = []
with open("teacher-answers/responses.jsonl") as f:
    for line in f:
        r = json.loads(line)
        head = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        chats.append(head + r["response"] + "<|im_end|>\n")
out, c = [], 0
for g in generic:
    out.append(g + "\n\n")
    n = 0
    while c < len(chats) and n < 2000:
        out.append(chats[c])
        n += len(chats[c])
        c += 1
out.extend(chats[c:])
text = "".join(out)
Path("recovery_mix_text.txt").write_text(text)
ids = tok.encode(text)
used = 500 * 4 * 256  # the shipped run's training tokens
prefix = tok.decode(ids[:used], skip_special_tokens=False)
while not text.startswith(prefix):  # a token boundary inside a character: start at the token before
    used -= 1
    prefix = tok.decode(ids[:used], skip_special_tokens=False)
start = len(prefix)
Path("data_start.txt").write_text(f"{start}\n")
print(f"{len(text)} characters, {len(ids)} tokens; the shipped run read {used} tokens, to character {start}")
