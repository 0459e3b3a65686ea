"""DPO pairs for run dpo-4 (continuing dpo-2): more weight on the three forms still near zero on the
dev splits (all lowercase, all capitals, the repeated request) and pairs that tell the forms apart.

dpo-2 had 100 editor pairs each for those, every one "the form against the plain answer", and
after it some case prompts were answered in quotes. Here, beside the editor's pairs (ed80.jsonl,
as dpo-2), **added-form pairs**:
- a prompt of other families (its constraints followed by the editor's answer C) with the
  lowercase or capitals sentence appended (if-verifiable's own build_description) or the request
  to repeat it, preferring F(C) to C, to C in the other case, to C in quotes, or (repeat) to C
  after a copy of the task alone;
- the same on the bare task with round 3's full-length answer (edit-data-1's saved answers, up to
  200 words), so a form holds over a long answer too (repeat conflicts with most families, so
  most of its pairs are here).
Every preferred answer is checked by the verifier against every constraint of its prompt. The
unasked-form pairs and other families' pairs of dpo-2 come along so a form stays preferred only
where it is asked.

Usage: make_pairs.py prompts_20k.jsonl ed80.jsonl full_answers.jsonl > pairs.jsonl"""

import json
import random
import sys
from pathlib import Path

from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

from afmkit.posttrain.synth_if import instruction_conflicts
from afmkit.posttrain.verifiable import instruction_rewards, is_loop

LOWER, CAPS = "change_case:english_lowercase", "change_case:english_capital"
QUOTE, REPEAT = "startend:quotation", "combination:repeat_prompt"
FORMS = {
    QUOTE: lambda c, row: f'"{c}"',
    CAPS: lambda c, row: c.upper(),
    LOWER: lambda c, row: c.lower(),
    REPEAT: lambda c, row: f"{row['task']}\n\n{c}",
}
# for an added form, the answers that do not follow it: plain, the other case, quoted, or (for the
# repeated request) a copy of the task without its constraints
WRONG = {LOWER: [None, CAPS, QUOTE], CAPS: [None, LOWER, QUOTE], REPEAT: [None, "task"]}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


conflicts = instruction_conflicts()
description = {f: INSTRUCTION_DICT[f](f).build_description() for f in (LOWER, CAPS)}
ADDED_CAP = {LOWER: 120, CAPS: 120, REPEAT: 100}
rng = random.Random(0)


def added_form(row, chosen, form):
    """A chat whose prompt adds ``form`` to ``row``'s, or None where the form conflicts or F(C) fails."""
    ids = list(row["instruction_id_list"])
    if any(form in conflicts[i] or i in conflicts[form] or i in FORMS for i in ids):
        return None
    if form == REPEAT:  # synth-if's (and IFEval's) layout: the request, then the sentence asking to repeat it
        kwargs = {"prompt_to_repeat": row["prompt"]}
        text = f"{row['prompt']}\n{INSTRUCTION_DICT[form](form).build_description(**kwargs)}"
        preferred = f"{row['prompt']}\n\n{chosen}"
    else:
        kwargs = {}
        text = f"{row['prompt']} {description[form]}" if ids else f"{row['task']}\n\n{description[form]}"
        preferred = FORMS[form](chosen, row)
    new = {
        **row,
        "id": f"{row['id']}+{form.split(':')[1]}",
        "prompt": text,
        "instruction_id_list": [*ids, form],
        "kwargs": [*row["kwargs"], kwargs],
    }
    if not instruction_rewards([new], [preferred]).strict_all[0]:
        return None
    wrong = rng.choice(WRONG[form] if ids or form != REPEAT else [None])
    rejected = (
        chosen if wrong is None else f"{row['task']}\n\n{chosen}" if wrong == "task" else FORMS[wrong](chosen, row)
    )
    return {
        "prompt_id": new["id"],
        "task_source": row["task_source"],
        "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": preferred}],
        "rejected": rejected,
        "added_form": form,
        "rejected_form": wrong or "plain",
    }


def add_form(out, counts, caps, row, chosen, form):
    """Append ``added_form(row, chosen, form)`` to ``out`` while ``counts[form]`` is under
    ``caps[form]``; True if a pair was added."""
    if counts.get(form, 0) >= caps[form]:
        return False
    pair = added_form(row, chosen, form)
    if pair is None:
        return False
    counts[form] = counts.get(form, 0) + 1
    out.append(pair)
    return True


def bare_tasks(prompts, full):
    """{task source: its task as a prompt without constraints}, for the train tasks whose full
    answer (round 3's) has at most 200 words and no loop."""
    tasks = {}
    for row in prompts.values():
        if row["split"] == "train" and row["task_source"] in full:
            tasks.setdefault(row["task_source"], row)
    return {
        source: {**row, "id": f"task:{source}", "prompt": row["task"], "instruction_id_list": [], "kwargs": []}
        for source, row in sorted(tasks.items())
        if len(full[source].split()) <= 200 and not is_loop(full[source])
    }


def write_pairs(out, counts, rng):
    """The pairs in a shuffled order to stdout, their counts to stderr."""
    rng.shuffle(out)
    for chat in out:
        print(json.dumps(chat))
    print(json.dumps({**counts, "pairs": len(out)}), file=sys.stderr)


def main():
    prompts = {row["id"]: row for row in read_jsonl(sys.argv[1])}
    chats = read_jsonl(sys.argv[2])
    full = {r["task_source"]: r["answer"] for r in read_jsonl(sys.argv[3]) if r["answer"]}
    rng.shuffle(chats)
    counts = {"editor": {f: 0 for f in FORMS}, "others": 0, "unasked": 0, "added_to_prompt": {}, "added_to_task": {}}
    out = []
    for chat in chats:
        row = prompts[chat["prompt_id"]]
        families = set(row["instruction_id_list"])
        asked = families & set(FORMS)
        chosen = chat["messages"][-1]["content"]
        if asked:
            caps_cap = 150 if asked & {LOWER, CAPS} else 100  # half again as many case pairs as dpo-2
            if "rejected" in chat and any(counts["editor"][f] < caps_cap for f in asked):
                for f in asked:
                    counts["editor"][f] += 1
                out.append(chat)
            continue
        if "rejected" in chat and counts["others"] < 120:
            counts["others"] += 1
            out.append(chat)
            continue
        if add_form(out, counts["added_to_prompt"], ADDED_CAP, row, chosen, rng.choice(sorted(ADDED_CAP))):
            continue
        if counts["unasked"] < 150 and not any(f.startswith("change_case") for f in families):
            form = rng.choice(sorted(FORMS))
            wrong = FORMS[form](chosen, row)
            if wrong != chosen:
                counts["unasked"] += 1
                out.append({**chat, "rejected": wrong, "unasked_form": form})

    # the bare task with round 3's full answer (one per task), so a form holds over a long answer
    for source, bare in bare_tasks(prompts, full).items():
        form = rng.choice([LOWER, CAPS, REPEAT])  # the repeated request conflicts with most families: here it fits
        add_form(out, counts["added_to_task"], dict.fromkeys(FORMS, 60), bare, full[source], form)
    write_pairs(out, counts, rng)


if __name__ == "__main__":
    main()
