"""Rollout throughput: K sampled responses per synth-if prompt through the one engine, the step
that dominates RL and rejection sampling (issue 12 section 8).

Measures generated tokens per second of ``posttrain.rollout.rollout`` (scoring excluded) for the
base alone and for a committee of the base plus LoRA adapters decoding in one mixed-adapter
batch, after a warm-up run of the same requests (compilation excluded). Prints one JSON object.

    python benchmarks/rollout.py --prompts /work/data/synth_if/prompts.jsonl --n-prompts 16 --samples 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax

import afmkit
from afmkit.adapters.lora import LoraConfig, random_adapter
from afmkit.posttrain.rollout import Member, RolloutSettings, rollout
from afmkit.posttrain.synth_if import read_prompts


def measure(members, prompts, settings):
    print(f"warming up {len(members)} member(s)...", file=sys.stderr, flush=True)
    # Warm-up on the same requests: compiles every batch, prompt and cache shape the timed run meets.
    rollout(members, prompts, settings, scorers=())
    stats = {}
    samples = rollout(members, prompts, settings, scorers=(), stats=stats)
    return {
        "members": len(members),
        "rows": len(samples),
        "tokens": stats["tokens"],
        "seconds": round(stats["seconds"], 2),
        "tokens_per_second": round(stats["tokens_per_second"], 1),
        "length_share": round(sum(s.finish_reason == "length" for s in samples) / len(samples), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default=None, help="weights (default: afmkit.load's, int4 on CPUs)")
    parser.add_argument("--prompts", default="/work/data/synth_if/prompts.jsonl")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=2, help="LoRA members beside the base (0: base only)")
    args = parser.parse_args()

    model = afmkit.load(args.model, dtype=args.dtype)
    prompts = read_prompts(args.prompts, split="train")[: args.n_prompts]
    settings = RolloutSettings(samples=args.samples, max_new_tokens=args.max_new_tokens, batch=args.batch, seed=0)
    lora = LoraConfig(rank=16, alpha=32.0)
    committee = [Member("base", model)] + [
        Member(f"lora{i}", model, random_adapter(model.config, lora, jax.random.PRNGKey(i), name=f"lora{i}"))
        for i in range(args.adapters)
    ]
    started = time.perf_counter()
    result = {
        "model": repr(model),
        "machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
        "settings": {k: v for k, v in vars(args).items()},
        "base_only": measure(committee[:1], prompts, settings),
    }
    if args.adapters:
        result["mixed_committee"] = measure(committee, prompts, settings)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
