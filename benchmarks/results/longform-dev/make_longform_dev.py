"""Build longform-dev: a dev split of long-form writing prompts, for choosing checkpoints.

dev200 asks the short questions the training pairs ask (same generator, same pools), so it ranked
adapters unlike IFEval, whose prompts ask for essays, letters, stories and posts (docs/posttraining.md,
"Sixth run"). This split asks for pieces of writing *by construction*: each held-out hh-rlhf
question (the synth-if dev tasks of seed 0, never used by any training prompt) is framed as one of
eight kinds of writing, and synth-if's own code then adds 1-3 verifiable constraints and
decontaminates against IFEval. It was fixed, and committed, before any adapter was scored on it;
it is not to be changed by how its ranking compares with IFEval's.

    python make_longform_dev.py > longform_dev.jsonl
"""

import hashlib
import json
import sys

from afmkit.posttrain.synth_if import (
    POOLS,
    SynthIFSettings,
    Task,
    benchmark_decontaminators,
    build_prompts,
    decontaminate_tasks,
    load_tasks,
    split_tasks,
)

N_PROMPTS = 200
SEED = 35
MAX_QUESTION_WORDS = 40
FRAMES = (
    "Write a blog post that answers a reader's question: {q}",
    "Write an essay that responds to this question: {q}",
    "Write a letter to a friend who asked you: {q}",
    "Write an article for a magazine's advice column answering this question: {q}",
    "Write a short speech for a community meeting on this question: {q}",
    'Write a short story in which a character asks "{q}" and finds the answer.',
    "Write a poem inspired by this question: {q}",
    "Write an email to a colleague who asked you: {q}",
)


def frame(question: str) -> str:
    pick = hashlib.blake2b(f"longform-dev/{SEED}/{question}".encode(), digest_size=8).digest()
    return FRAMES[int.from_bytes(pick, "big") % len(FRAMES)].format(q=question)


def main() -> None:
    # The synth-if dev split of prompts_20k.jsonl (seed 0, default pools), rebuilt with its own code.
    tasks, _ = load_tasks(list(POOLS))
    clean, _ = decontaminate_tasks(tasks, benchmark_decontaminators())
    settings = SynthIFSettings()
    held_out = split_tasks(clean, seed=settings.seed, dev_fraction=settings.dev_fraction)["dev"]
    questions = [
        t
        for t in held_out
        if t.pool == "hh-rlhf-helpful" and t.text.strip().endswith("?") and len(t.text.split()) <= MAX_QUESTION_WORDS
    ]
    framed = [Task(text=frame(t.text.strip()), source=t.source, pool="longform-dev") for t in questions]
    rows, report = build_prompts(framed, N_PROMPTS, seed=SEED, dev_fraction=0.0)
    for i, row in enumerate(rows):
        row["id"] = row["key"] = f"longform-dev-{i:03d}"
        row["split"] = "dev"
        print(json.dumps(row))
    print(
        f"{len(held_out)} held-out tasks, {len(questions)} questions framed, {len(rows)} prompts; "
        f"decontamination: {json.dumps(report['decontamination']['dropped_tasks'])}, "
        f"boundary redraws: {json.dumps(report['decontamination']['redrawn_prompts_boundary'])}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
