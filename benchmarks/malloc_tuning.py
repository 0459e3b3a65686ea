"""What glibc's malloc settings do to a training command: ``afmkit posttrain sft`` run with the
training commands' own settings (``runtime.KEEP_FREED_MEMORY``, the default) and with glibc's
defaults (``AFMKIT_MALLOC=default``), alternating, in one run on one machine.

XLA:CPU frees its per-call temporary buffer after every step; with glibc's defaults that buffer
is mmapped again and faulted in page by page each step (docs/training.md, "Memory the trainer keeps"). This
measures per setting: the median step time (from the run's metrics.jsonl, first step dropped:
it compiles), the child's page faults, user and kernel seconds, and peak RSS. Cases: a rank-16
LoRA over the int4 GGUF (what sft/itec/rl/recover train) and ``--full`` float32 weights.

    python benchmarks/malloc_tuning.py --steps 8 --json benchmarks/results/malloc_tuning.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from afmkit.files import shared_data_dir

# the console script installed beside this interpreter (a venv), else the one on PATH
AFMKIT = (
    str(Path(sys.executable).with_name("afmkit"))
    if Path(sys.executable).with_name("afmkit").exists()
    else shutil.which("afmkit") or "afmkit"
)
SETTINGS = {"keep_freed_memory": {}, "glibc_default": {"AFMKIT_MALLOC": "default"}}


def chats_file(path: Path, shared: Path) -> Path:
    """Self-Instruct's seed tasks (Apache-2.0) as single-turn chats."""
    with open(shared / "sft" / "self_instruct_seed_tasks.jsonl") as src, open(path, "w") as out:
        for line in src:
            task = json.loads(line)
            instance = task["instances"][0]
            prompt = task["instruction"] + (f"\n\n{instance['input']}" if instance["input"] else "")
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": instance["output"]}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_once(
    case_flags: list[str], env_extra: dict, data: Path, out: Path, steps: int, batch: int, seq_len: int
) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "AFMKIT_MALLOC")}
    env.update(env_extra)
    command = [
        AFMKIT, "posttrain", "sft", "--data", str(data), "--out", str(out),
        "--steps", str(steps), "--batch", str(batch), "--seq-len", str(seq_len), "--warmup", "1",
        "--save-every", str(steps * 10), "--eval-fraction", "0.05", "--quiet", *case_flags,
    ]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    # wait4 gives this child's own usage (RUSAGE_CHILDREN's peak RSS is a maximum over all children
    # so far); the command's restart with the malloc settings is an exec, so the same pid counts it.
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, command)
    lines = (out / "training" / "metrics.jsonl").read_text().splitlines()
    steps_seconds = [json.loads(line)["seconds"] for line in lines if '"seconds"' in line]
    return {
        "wall_seconds": round(wall, 2),
        "median_step_seconds": round(statistics.median(steps_seconds[1:]), 3),
        "step_seconds": steps_seconds,
        "user_seconds": round(usage.ru_utime, 2),
        "kernel_seconds": round(usage.ru_stime, 2),
        "minor_faults": usage.ru_minflt,
        "max_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two settings per case")
    parser.add_argument("--cases", default="lora-int4,full-float32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shared = shared_data_dir()
    cases = {"lora-int4": [], "full-float32": ["--full", "--dtype", "float32"]}
    report = {
        "benchmark": "posttrain sft with the training commands' malloc settings vs glibc defaults",
        "settings": {k: getattr(args, k) for k in ("steps", "batch", "seq_len", "rounds")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = chats_file(Path(tmp) / "chats.jsonl", shared)
        for case in args.cases.split(","):
            runs: dict[str, list] = {name: [] for name in SETTINGS}
            for round_ in range(args.rounds):
                order = list(SETTINGS) if round_ % 2 == 0 else list(SETTINGS)[::-1]
                for name in order:
                    out = Path(tmp) / f"{case}-{name}-{round_}"
                    runs[name].append(
                        run_once(cases[case], SETTINGS[name], data, out, args.steps, args.batch, args.seq_len)
                    )
                    print(case, name, round_, runs[name][-1]["median_step_seconds"], file=sys.stderr)
            summary = {
                name: {
                    "median_step_seconds": statistics.median(s for r in rs for s in r["step_seconds"][1:]),
                    "kernel_seconds": statistics.median(r["kernel_seconds"] for r in rs),
                    "user_seconds": statistics.median(r["user_seconds"] for r in rs),
                    "minor_faults": statistics.median(r["minor_faults"] for r in rs),
                    "max_rss_mib": statistics.median(r["max_rss_mib"] for r in rs),
                }
                for name, rs in runs.items()
            }
            ratio = (
                summary["keep_freed_memory"]["median_step_seconds"] / summary["glibc_default"]["median_step_seconds"]
            )
            report["cases"][case] = {
                "runs": runs,
                "summary": summary,
                "step_time_ratio_keep_vs_default": round(ratio, 3),
            }
    report["machine"]["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
