"""Compare the base model and the summarization adapter on held-out texts.

Generates greedily for the first ``--n`` held-out conversations (the last 10% of train.jsonl, the
same split as ``afmkit adapter train --eval-fraction 0.1``), with the base model and with the
adapter in one mixed batch, and reports how often the output equals the extractive target and
its mean unigram F1 against the target. Prints JSON (and a few examples with --show).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import afmkit
from afmkit.adapters.peft_io import load_adapter
from afmkit.infer.sampling import SamplingParams

HERE = Path(__file__).parent


def unigram_f1(output: str, target: str) -> float:
    out, ref = Counter(re.findall(r"\w+", output.lower())), Counter(re.findall(r"\w+", target.lower()))
    overlap = sum((out & ref).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(out.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(HERE / "data" / "train.jsonl"))
    parser.add_argument("--adapter", default=str(HERE / "data" / "adapters" / "summarize"))
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--show", type=int, default=2)
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    held_out = rows[-max(1, round(len(rows) * 0.1)) :][: args.n]
    model = afmkit.load()
    adapter = load_adapter(args.adapter, config=model.config, params=model.params)
    prompts = [model.tokenizer.encode(model.tokenizer.apply_chat_template(r["messages"][:1])) for r in held_out]
    targets = [r["messages"][1]["content"] for r in held_out]
    outputs = model.engine.generate(
        prompts + prompts,
        SamplingParams(max_new_tokens=args.max_tokens),
        adapters=[None] * len(prompts) + [adapter] * len(prompts),
    )
    base, tuned = outputs[: len(prompts)], outputs[len(prompts) :]
    result = {}
    for label, outs in (("base", base), ("adapter", tuned)):
        texts = [o.text.strip() for o in outs]
        result[label] = {
            "exact_match": sum(t == g for t, g in zip(texts, targets)) / len(targets),
            "unigram_f1": sum(unigram_f1(t, g) for t, g in zip(texts, targets)) / len(targets),
            "mean_words": sum(len(t.split()) for t in texts) / len(texts),
        }
    result["target_mean_words"] = sum(len(t.split()) for t in targets) / len(targets)
    result["n"] = len(targets)
    print(json.dumps(result, indent=2))
    for i in range(min(args.show, len(targets))):
        print(f"\n--- text {i}: {held_out[i]['messages'][0]['content'][:400]}...")
        print(f"target : {targets[i]}\nbase   : {base[i].text.strip()}\nadapter: {tuned[i].text.strip()}")


if __name__ == "__main__":
    main()
