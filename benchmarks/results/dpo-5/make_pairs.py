"""DPO pairs for run dpo-5 (continuing dpo-4): the lowercase leak, capitals, the repeated request,
and loops.

dpo-4 learnt lowercase but then wrote 59 of 426 IFEval answers that ask for no case in lowercase;
capitals (6 of 25) and the repeated request (9 of 41) stayed low; 42.5% of its answers ran to the
limit (faults read off IFEval's per-family results; docs/posttraining.md, "Fifth run", says what
that means for dpo-5's IFEval). Here, on chats dpo-4's pairs did not use (ed80.jsonl, the same editor chats):
- **unasked pairs**, rejected mostly in lowercase: a chat whose prompt asks no form, its answer
  preferred to the same answer in lowercase (half), capitals (a quarter) or quotes (a quarter);
  also on the bare task with round 3's full-length answer, so long answers keep their case;
- **added-form pairs** (dpo-4's ``added_form``) for capitals and the repeated request, and fewer
  for lowercase;
- **loop pairs** from ``continue_loops.py``: dpo-4's greedy loop rejected, its cut answer
  continued without the loop preferred;
- the editor's pairs of other families, and 40 of dpo-4's pairs of each form replayed.
Every preferred answer of an added form is checked by the verifier against every constraint.

Usage: make_pairs.py prompts_20k.jsonl ed80.jsonl full_answers.jsonl dpo4_pairs.jsonl.gz
       loop_pairs.jsonl > pairs.jsonl"""

import gzip
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "dpo-4"))
from make_pairs import CAPS, FORMS, LOWER, QUOTE, REPEAT, add_form, bare_tasks, read_jsonl, write_pairs

ADDED = {CAPS: 110, REPEAT: 40, LOWER: 40}  # on editor prompts; repeat conflicts with most, so:
ADDED_TO_TASK = {CAPS: 50, REPEAT: 100, LOWER: 20}  # on bare tasks with a long answer
UNASKED, UNASKED_LONG, OTHERS, REPLAY = 200, 60, 150, 40
UNASKED_WRONG = [LOWER, LOWER, CAPS, QUOTE]


def keeps_loop_pair(row, chosen):
    if chosen == chosen.lower() and LOWER not in row["instruction_id_list"]:
        return False
    sentences = [" ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split()) for s in re.split(r"[.!?\n]", chosen)]
    sentences = [s for s in sentences if len(s) >= 24]
    return len(sentences) == len(set(sentences))


def main():
    prompts = {row["id"]: row for row in read_jsonl(sys.argv[1])}
    chats = read_jsonl(sys.argv[2])
    full = {r["task_source"]: r["answer"] for r in read_jsonl(sys.argv[3]) if r["answer"]}
    with gzip.open(sys.argv[4], "rt") as f:
        old = [json.loads(line) for line in f]
    # a loop pair is kept if its preferred answer is not in an unasked lowercase (dpo-4's leak,
    # which the NLL term would teach) and repeats no sentence even up to punctuation and markup
    loops = [
        p for p in read_jsonl(sys.argv[5]) if keeps_loop_pair(prompts[p["prompt_id"]], p["messages"][-1]["content"])
    ]
    used = {p["prompt_id"].split("+")[0] for p in old}  # an added form's id is the prompt's + the form
    rng = random.Random(5)
    rng.shuffle(chats)
    counts = {"unasked": {}, "unasked_long": 0, "others": 0, "added_to_prompt": {}, "added_to_task": {}}
    out = []
    for chat in chats:
        if chat["prompt_id"] in used:
            continue
        row = prompts[chat["prompt_id"]]
        families = set(row["instruction_id_list"])
        chosen = chat["messages"][-1]["content"]
        if families & set(FORMS) or any(f.startswith(("change_case", "language")) for f in families):
            continue
        if "rejected" in chat and counts["others"] < OTHERS:
            counts["others"] += 1
            out.append(chat)
            continue
        if add_form(out, counts["added_to_prompt"], ADDED, row, chosen, rng.choice(sorted(ADDED))):
            continue
        if sum(counts["unasked"].values()) < UNASKED:
            form = rng.choice(UNASKED_WRONG)
            wrong = FORMS[form](chosen, row)
            if wrong != chosen:
                counts["unasked"][form] = counts["unasked"].get(form, 0) + 1
                out.append({**chat, "rejected": wrong, "unasked_form": form})

    # bare tasks with round 3's full answer: added forms, and unasked lowercase on long answers
    usable = bare_tasks(prompts, full)
    sources = sorted({row["task_source"] for row in prompts.values() if row["split"] == "train"} & set(full))
    rng.shuffle(sources)  # every train task with a full answer, as drawn for the pairs (seed 5)
    for source in sources:
        if source not in usable:
            continue
        answer, bare = full[source], usable[source]
        if counts["unasked_long"] < UNASKED_LONG and answer.lower() != answer:
            counts["unasked_long"] += 1
            messages = [{"role": "user", "content": bare["prompt"]}, {"role": "assistant", "content": answer}]
            out.append(
                {
                    "prompt_id": bare["id"],
                    "task_source": source,
                    "messages": messages,
                    "rejected": answer.lower(),
                    "unasked_form": LOWER,
                }
            )
            continue
        add_form(out, counts["added_to_task"], ADDED_TO_TASK, bare, answer, rng.choice(sorted(ADDED_TO_TASK)))

    # dpo-4's pairs of each form replayed, so what it learnt is kept
    replay = {}
    for pair in old:
        form = pair.get("added_form") or next(
            (f for f in FORMS if f in prompts.get(pair["prompt_id"], {}).get("instruction_id_list", [])), None
        )
        if form and replay.get(form, 0) < REPLAY:
            replay[form] = replay.get(form, 0) + 1
            out.append(pair)
    counts["replayed"] = replay
    counts["loop_pairs"] = len(loops)
    out += loops
    write_pairs(out, counts, rng)


if __name__ == "__main__":
    main()
