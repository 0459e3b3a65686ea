"""Sampled pairs for the prompts whose greedy answer looped: K answers by the shipped model
(temperature 0.8, top-p 0.95, loops stopped as soon as they are loops); of those that finished on
their own and are no loop, the one the verifier scores highest (strict; the first on a tie) is
preferred to the whole greedy loop. A loop whose cut was too short for loop-cut has no pair
without this.

    python sample_pairs.py prompts.jsonl loopcut.answers.jsonl K SEED > sampled.jsonl
"""

import json
import sys
from collections import Counter
from pathlib import Path

import afmkit
from afmkit.posttrain.itec import as_chat
from afmkit.posttrain.rollout import Member, RolloutSettings, rollout


def main(prompts_path, answers_path, samples, seed):
    prompts = {row["id"]: row for row in map(json.loads, Path(prompts_path).read_text().splitlines())}
    looped = {
        a["prompt_id"]: a["text"].strip()
        for a in map(json.loads, Path(answers_path).read_text().splitlines())
        if a["loop"]
    }
    todo = [prompts[pid] for pid in prompts if pid in looped]
    model = afmkit.load("smollm2-135m-afm")
    settings = RolloutSettings(samples=samples, max_new_tokens=512, temperature=0.8, top_p=0.95, seed=seed)
    counts = Counter(prompts=len(todo))
    best = {}
    for sample in rollout([Member("dpo-10", model)], todo, settings):
        counts[sample.finish_reason] += 1
        if sample.finish_reason != "stop" or sample.loop or not sample.text.strip():
            continue
        kept = best.get(sample.prompt_id)
        if kept is None or sample.rewards["strict"] > kept.rewards["strict"]:
            best[sample.prompt_id] = sample
    for pid, sample in best.items():
        row = {"prompt_id": pid, "kind": "sampled", "reward": sample.rewards["strict"]}
        print(
            json.dumps(
                {**row, **as_chat(prompts[pid], sample.text.strip()), "rejected": looped[pid]}, ensure_ascii=False
            )
        )
    counts["pairs"] = len(best)
    print(json.dumps(counts), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
