"""One RLOO iteration of ``afmkit posttrain rl`` against TRL's ``RLOOTrainer`` on the same model
and settings, on CPU (issue 12 section 8): the ratio of their seconds per iteration, in one run.

Both sample K responses to each of the same synth-if train prompts (temperature 1, top-p 1, the
same token budget), score them with the same verifier (``verifiable.instruction_rewards``,
strict), compute the leave-one-out advantage with the KL penalty ``beta`` and take one optimizer
step on a rank-16 LoRA over every linear (AdamW, the same learning rate, microbatches of the same
size). TRL runs SmolLM2-135M-Instruct's float32 weights, exported to a Hugging Face directory by
afmkit's own exporter (so both run the same numbers); afmkit runs them as float32 too and, by
default on CPUs, as the GGUF's int4 weights. Each side runs ``--iterations`` iterations (new
prompts each) and the median of all but the first is its time per iteration (the first compiles
/ warms up). afmkit also compiles its update again when an iteration's rows take a length not
seen before (a long run pays that a few times in all); ``speedup_vs_trl`` counts those
iterations in the median, ``speedup_vs_trl_without_compiling`` leaves them out. Prints one JSON object and writes it to ``--json``. By
default the script restarts itself with the glibc settings the training commands use
(``--malloc keep``; ``--malloc default`` keeps glibc's own), so both sides run under the same ones.

    python benchmarks/posttrain.py --n-prompts 8 --k 4 --max-new-tokens 64 \\
        --json benchmarks/results/posttrain_rloo_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import afmkit
from afmkit.posttrain import verifiable
from afmkit.posttrain.rl import RLSettings, rl
from afmkit.posttrain.synth_if import (
    SynthIFSettings,
    benchmark_decontaminators,
    build_prompts,
    load_tasks,
    read_prompts,
)


def ours(args, dtype, prompts_file, work):
    model = afmkit.load(args.model, dtype=dtype)
    settings = RLSettings(
        algo="rloo",
        k=args.k,
        beta=args.beta,
        iterations=args.iterations,
        prompts_per_iteration=args.n_prompts,
        lr=args.lr,
        lora_rank=16,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        train_batch=args.train_batch,
        dev_prompts=0,
        quiet=True,
    )
    started = time.perf_counter()
    records = rl(model, prompts_file, Path(work) / f"ours-{dtype}", settings)
    later = records[1:]
    steady = [r["seconds"] for r in later if not r["new_row_shape"]]
    middle = sorted(later, key=lambda r: r["seconds"])[len(later) // 2]  # the median iteration (upper)
    return {
        "dtype": dtype,
        "first_iteration_seconds": round(time.perf_counter() - started - sum(r["seconds"] for r in later), 1),
        "iteration_seconds": [round(r["seconds"], 2) for r in later],
        "new_row_shape": [r["new_row_shape"] for r in later],  # those iterations compiled the update
        "seconds_per_iteration": round(statistics.median(r["seconds"] for r in later), 2),
        "seconds_per_iteration_without_compiling": round(statistics.median(steady), 2) if steady else None,
        "median_iteration": {
            "rollout_seconds": round(middle["rollout_seconds"], 2),
            "train_seconds": round(middle["train_seconds"], 2),
            "rollout_tokens_per_second": round(middle["rollout_tokens_per_second"], 1),
            "train_tokens": middle["train_tokens"],
            "train_tokens_per_second": round(middle["train_tokens_per_second"], 1),
        },
        "response_length": statistics.mean(r["response_length"] for r in later),
        "mean_reward": statistics.mean(r["mean_reward"] for r in later),
    }


def trl_side(args, rows, work):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from afmkit.interop.export import export_model

    hf_dir = Path(work) / "hf"
    export_model(afmkit.load(args.model, dtype="float32"), hf_dir, fmt="safetensors", dtype="f32")
    by_prompt = {r["prompt"]: r for r in rows}

    def reward(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        users = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return [float(x) for x in verifiable.instruction_rewards([by_prompt[u] for u in users], texts).strict]

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args_, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    timer = Timer()
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows * 2])
    completions = args.n_prompts * args.k
    config = RLOOConfig(
        output_dir=str(Path(work) / "trl"),
        use_cpu=True,
        num_generations=args.k,
        per_device_train_batch_size=args.train_batch,
        gradient_accumulation_steps=completions // args.train_batch,  # one generation round per step
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        beta=args.beta,
        learning_rate=args.lr,
        max_steps=args.iterations,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        shuffle_dataset=False,
        seed=0,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    trainer = RLOOTrainer(
        model=str(hf_dir), reward_funcs=reward, args=config, train_dataset=data, peft_config=lora, callbacks=[timer]
    )
    started = time.perf_counter()
    trainer.train()
    ends = timer.ends
    later = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "torch_threads": torch.get_num_threads(),
        "first_iteration_seconds": round(ends[0] - started, 1),
        "iteration_seconds": [round(t, 2) for t in later],
        "seconds_per_iteration": round(statistics.median(later), 2),
        "log": [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in trainer.state.log_history],
    }


def synth_if_rows(n: int) -> list[dict]:
    tasks, _ = load_tasks(list(SynthIFSettings.tasks))
    rows, _ = build_prompts(tasks, n, seed=0, decontaminators=benchmark_decontaminators())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--prompts",
        default=None,
        help="a synth-if prompts file (default: made here from the shipped task pools, seed 0)",
    )
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=6, help="per side; all but the first are timed")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--train-batch", type=int, default=4, help="completions per microbatch")
    parser.add_argument(
        "--dtypes", default="float32,int4", help="afmkit's weights, comma-separated ('': TRL's side only)"
    )
    parser.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: restart with the training commands' glibc settings (runtime.KEEP_FREED_MEMORY), as "
        "`afmkit posttrain rl` does; both sides run in that one process. default: glibc's own",
    )
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations must be at least 2: the first is not timed")
    if args.malloc == "keep":
        from afmkit.runtime import restart_keeping_freed_memory

        restart_keeping_freed_memory()

    with tempfile.TemporaryDirectory(prefix="bench-posttrain-") as work:
        all_rows = (
            read_prompts(args.prompts) if args.prompts else synth_if_rows(2 * args.iterations * args.n_prompts + 20)
        )
        # Both sides see the same n prompts per iteration, in the same order.
        rows = [r for r in all_rows if r["split"] == "train"][: args.iterations * args.n_prompts]
        dev = [r for r in all_rows if r["split"] == "dev"][:1]
        prompts_file = Path(work) / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *dev]))
        result = {
            "benchmark": "one RLOO iteration: afmkit posttrain rl vs TRL RLOOTrainer",
            "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "load": os.getloadavg(),
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            },
        }
        print("afmkit ...", file=sys.stderr, flush=True)
        result["afmkit"] = []
        for dtype in [d for d in args.dtypes.split(",") if d]:
            result["afmkit"].append(ours(args, dtype, prompts_file, work))
            print(json.dumps(result["afmkit"][-1]), file=sys.stderr, flush=True)  # kept if TRL fails
        print("TRL ...", file=sys.stderr, flush=True)
        result["trl"] = trl_side(args, rows, work)
        import trl

        result["trl_version"] = trl.__version__
        trl_seconds = result["trl"]["seconds_per_iteration"]
        result["speedup_vs_trl"] = {
            r["dtype"]: round(trl_seconds / r["seconds_per_iteration"], 2) for r in result["afmkit"]
        }
        result["speedup_vs_trl_without_compiling"] = {
            r["dtype"]: round(trl_seconds / r["seconds_per_iteration_without_compiling"], 2)
            for r in result["afmkit"]
            if r["seconds_per_iteration_without_compiling"]
        }
        result["machine"]["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
