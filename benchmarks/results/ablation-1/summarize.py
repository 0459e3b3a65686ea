"""The ablation's table (README.md): per arm, dev200's strict average (prompt / instruction),
the paired bootstrap against the base, answers at the 256-token limit, loops, median words, and
what the arm cost (tokens sampled and trained, wall time, peak RSS). Run in the run folder.

Usage: python summarize.py [RUN_FOLDER]"""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from afmkit.posttrain.verifiable import is_loop

HERE = Path(__file__).resolve().parent
run = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
ARMS = ["base", "sft", "rs", "rloo", "mdloo", "ppo-clip"]


def wall_and_peak(name):
    path = run / f"{name}.time"
    if not path.is_file():
        return None, None
    text = path.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 2**20
    return round(seconds), round(peak, 2)


def training_cost(name):
    """Tokens sampled (RL and iTeC) and trained, as the runs recorded them: RL's ``train_tokens``
    count the update's tokens (each prompt once per row, times the steps); SFT's rows are padded."""
    cost = {}
    sft_metrics = {"sft": run / "sft" / "training", "rs": run / "rs" / "round-01" / "adapter" / "training"}
    if name in sft_metrics:  # SFT steps: packed rows of --seq-len, padding included
        records = [json.loads(line) for line in (sft_metrics[name] / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "tokens" in r]
        cost["trained_positions"] = sum(r["tokens"] for r in records)
        cost["epochs"] = records[-1]["epoch"]
    if name == "rs":
        samples = [json.loads(line) for line in (run / "rs" / "round-01" / "samples.jsonl").read_text().splitlines()]
        cost["sampled_tokens"] = sum(len(s["tokens"]) for s in samples)
        cost["winners"] = len((run / "rs" / "round-01" / "winners.jsonl").read_text().splitlines())
    if name in ("rloo", "mdloo", "ppo-clip"):
        records = [json.loads(line) for line in (run / name / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "mean_reward" in r]
        cost["sampled_tokens"] = round(sum(r["response_length"] * 32 for r in records))
        cost["trained_tokens"] = sum(r["train_tokens"] for r in records)
        cost["mean_reward_by_iteration"] = [round(r["mean_reward"], 3) for r in records]
        cost["kl_to_reference_last"] = round(records[-1]["kl_to_reference"], 4)
    return cost


rows = []
for arm in ARMS:
    folder = run / f"eval-{arm}"
    if not (folder / "results.json").is_file():
        continue
    results = json.loads((folder / "results.json").read_text())
    responses = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    row = {
        "arm": arm,
        "strict_average": results["strict_average"],
        "prompt_strict": results["prompt_strict"],
        "inst_strict": results["inst_strict"],
        "at_limit": sum(r["finish_reason"] == "length" for r in responses),
        "loops": sum(is_loop(r["response"]) for r in responses),
        "median_words": statistics.median(len(r["response"].split()) for r in responses),
    }
    if arm != "base":
        out = subprocess.run(
            [sys.executable, str(HERE.parent / "dpo-6" / "paired_bootstrap.py"), str(run / "eval-base"), str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        boot = json.loads(out.stdout)
        row["minus_base"], row["interval_95"] = boot["b_minus_a"], boot["interval_95"]
        row["train_wall_s"], row["train_peak_rss_gb"] = wall_and_peak(arm)
        row |= training_cost(arm)
    row["eval_wall_s"] = wall_and_peak(f"eval-{arm}")[0]
    rows.append(row)
print(json.dumps(rows, indent=1))
