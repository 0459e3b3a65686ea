"""The RL update's step on packed rows (1,024 positions by default), attention block by block
(``transformer.CAUSAL_BLOCK``: each block of queries reads only the keys up to its end) against
the whole row at once, in one process, alternating.

The step is the trainer's (``train_step_fn``, MDLOO's objective, a rank-16 LoRA over
SmolLM2-135M-Instruct at the weights' default format, int4 on CPUs) on two rows laid out as
``posttrain rl`` lays them out: per row a prompt of 85 tokens per 512 positions, each with four
answers sharing it (100 tokens each, fewer where the row is shorter), and padding after.

    python benchmarks/packed_attention.py --repeats 3 > result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import afmkit
from afmkit.adapters.lora import LoraConfig
from afmkit.model import transformer
from afmkit.train.objectives import Policy, PolicyBatch
from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule
from afmkit.train.step import StepConfig, init_state, train_step_fn
from afmkit.train.trainable import LoraWeights

PROMPT, ANSWER, K = 85, 100, 4


def policy_batch(vocab: int, rng: np.random.Generator, *, rows: int, seq: int) -> PolicyBatch:
    names = ("tokens", "targets", "positions", "segment_ids", "branch_ids")
    fields = {n: np.zeros((rows, seq), np.int32) for n in names}
    loss_mask = np.zeros((rows, seq), np.float32)
    segments = max(1, seq // 512)
    answer = min(ANSWER, (seq // segments - PROMPT) // K)
    for row in range(rows):
        at = 0
        for segment in range(1, segments + 1):
            span = slice(at, at + PROMPT)
            fields["positions"][row, span], fields["segment_ids"][row, span] = np.arange(PROMPT), segment
            at += PROMPT
            for branch in range(1, K + 1):
                span = slice(at, at + answer)
                fields["positions"][row, span] = PROMPT + np.arange(answer)
                fields["segment_ids"][row, span], fields["branch_ids"][row, span] = segment, branch
                loss_mask[row, span] = 1
                at += answer
    fields["tokens"] = rng.integers(1, vocab, (rows, seq)).astype(np.int32)
    fields["targets"] = np.roll(fields["tokens"], -1, axis=1)
    return PolicyBatch(
        **{k: jnp.asarray(v) for k, v in fields.items()},
        loss_mask=jnp.asarray(loss_mask),
        old_log_probs=jnp.full((rows, seq), -2.0, jnp.float32),
        advantages=jnp.asarray(rng.standard_normal((rows, segments * K)).astype(np.float32)),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant, alternating (default 3)")
    parser.add_argument("--seq", type=int, default=1024, help="positions per row (default 1024)")
    parser.add_argument("--rows", type=int, default=2, help="rows per step (default 2)")
    parser.add_argument(
        "--block",
        type=int,
        default=transformer.CAUSAL_BLOCK,
        help=f"queries per block (default {transformer.CAUSAL_BLOCK})",
    )
    args = parser.parse_args()

    model = afmkit.load("smollm2-135m-instruct")
    config, frozen = model.config, model.params
    subset = LoraWeights(LoraConfig(rank=16))
    objective = Policy(algo="mdloo", step_size=1.0)
    opt = OptimizerConfig(name="adamw", peak_lr=1e-5, warmup_steps=0, total_steps=100, weight_decay=0.0)
    optimizer = build_optimizer(opt)
    batch = policy_batch(config.vocab_size, np.random.default_rng(0), rows=args.rows, seq=args.seq)
    blocks = {"blocks": args.block, "whole_row": args.seq + 1}

    def compiled(block: int):
        transformer.CAUSAL_BLOCK = block  # read while tracing: each variant compiles its own step
        step = jax.jit(
            lambda s, b, f: train_step_fn(
                s,
                b,
                f,
                config=config,
                optimizer=optimizer,
                schedule=lr_schedule(opt),
                step_config=StepConfig(),
                mesh=None,
                subset=subset,
                objective=objective,
            )
        )
        state = init_state(config, optimizer, seed=0, subset=subset, objective=objective)
        start = time.perf_counter()
        state, metrics = step(state, batch, frozen)
        metrics["loss"].block_until_ready()
        return step, state, time.perf_counter() - start, float(metrics["loss"])

    steps, states, first, losses = {}, {}, {}, {}
    for name, block in blocks.items():
        steps[name], states[name], first[name], losses[name] = compiled(block)
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for _ in range(args.repeats):
        for name in blocks:
            start = time.perf_counter()
            states[name], metrics = steps[name](states[name], batch, frozen)
            metrics["loss"].block_until_ready()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "benchmark": "RL update step on packed rows: attention by blocks vs whole row",
                "rows": args.rows,
                "seq": args.seq,
                "causal_block": blocks["blocks"],
                "weights": str(model),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
                "first_step_s": {k: round(v, 2) for k, v in first.items()},
                "first_loss": losses,
                "step_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "median_step_s": {k: round(v, 3) for k, v in median.items()},
                "blocks_over_whole_row": round(median["blocks"] / median["whole_row"], 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
