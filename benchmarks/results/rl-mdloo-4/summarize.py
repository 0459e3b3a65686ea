"""rl-mdloo-4's summary (summary.txt): dev scores, averages per ten iterations, the run's time and
its stability figures, from metrics.jsonl."""

import json
from pathlib import Path

rows = [json.loads(line) for line in Path("metrics.jsonl").read_text().splitlines()]
dev = [(r["step"], round(r["dev_strict"], 3), round(r["dev_strict_all"], 3), r.get("dev_loop_share")) for r in rows if "dev_strict" in r]  # fmt: skip
print("dev", dev)
iterations = [r for r in rows if "mean_reward" in r]


def mean(block: list[dict], key: str) -> float:
    return round(sum(r[key] for r in block) / len(block), 3)


for start in range(0, len(iterations), 10):
    block = iterations[start : start + 10]
    print(
        f"iters {block[0]['step']}-{block[-1]['step']}: reward {mean(block, 'mean_reward')} "
        f"KL {mean(block, 'kl_to_reference')} len {mean(block, 'response_length')} "
        f"max-tok {mean(block, 'max_tokens_share')} loops {mean(block, 'loop_share')} secs {mean(block, 'seconds')} "
        f"rollout tok/s {mean(block, 'rollout_tokens_per_second')} train tok/s {mean(block, 'train_tokens_per_second')}"
    )
print("total seconds", round(sum(r["seconds"] for r in iterations)), "iterations", len(iterations))
print("max ratio_last", max(r["ratio_last"] for r in iterations), "max kl_prev", max(r["kl_to_previous_last"] for r in iterations))  # fmt: skip
