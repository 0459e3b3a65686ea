"""Temporary memory of one training step by layer count, with and without recomputing each
layer's activations in the backward pass (``StepConfig.recompute``): XLA's own accounting of the
compiled step (``memory_analysis().temp_size_in_bytes``), so nothing runs and the number does not
depend on the machine's load. LoRA (rank 16, every linear) over a random fp32 base of the chosen
size, assistant-only SFT on ``--batch`` packed rows of ``--seq-len`` tokens (``posttrain sft``'s
defaults). ``--time-steps N`` also runs N steps of the size's own depth each way, alternating,
and reports the time ratio (the price of recomputing).

    python benchmarks/train_memory.py --time-steps 3 --json benchmarks/results/train_memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.adapters.lora import LoraConfig
from afmkit.config import get_size
from afmkit.kernels import cpu_name
from afmkit.model.transformer import init_params
from afmkit.train.objectives import assistant_sft
from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule
from afmkit.train.step import Batch, StepConfig, init_state, train_step_fn
from afmkit.train.trainable import LoraWeights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", default="2,8,0", help="layer counts to compile (0: the size's own)")
    parser.add_argument("--time-steps", type=int, default=0, help="also time this many steps each way")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    counts = [int(x) for x in args.layers.split(",")]
    if len(counts) < 2:
        parser.error("--layers needs at least two layer counts (the per-layer figure is their difference)")

    result: dict = {
        "benchmark": "training step temporary memory (XLA's accounting), LoRA SFT, recompute on/off",
        "settings": vars(args),
    }
    for recompute in (False, True):
        rows = []
        for layers in counts:
            config = get_size(args.size)
            config = dataclasses.replace(config, n_layers=layers or config.n_layers)
            rows.append(measure(config, args, recompute))
            print(rows[-1], flush=True)
        per_layer = (rows[1]["temp_gib"] - rows[0]["temp_gib"]) / (rows[1]["layers"] - rows[0]["layers"])
        result["recompute" if recompute else "keep_activations"] = {
            "rows": rows,
            "temp_gib_per_layer": round(per_layer, 3),
        }
    if args.time_steps:
        result["step_seconds"] = time_steps(get_size(args.size), args)
        seconds = result["step_seconds"]
        result["recompute_time_ratio"] = round(
            statistics.median(seconds["recompute"]) / statistics.median(seconds["keep_activations"]), 3
        )
    result["machine"] = {"platform": platform.platform(), "processor": cpu_name(), "jax": jax.__version__}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _setup(config, recompute: bool):
    subset = LoraWeights(LoraConfig(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up", "down")))
    objective = assistant_sft()
    opt = OptimizerConfig(name="adamw", peak_lr=1e-4, warmup_steps=1, total_steps=10, weight_decay=0.0)
    optimizer = build_optimizer(opt)
    step = jax.jit(
        lambda s, b, f: train_step_fn(
            s,
            b,
            f,
            config=config,
            optimizer=optimizer,
            schedule=lr_schedule(opt),
            step_config=StepConfig(recompute=recompute),
            mesh=None,
            subset=subset,
            objective=objective,
        )
    )
    return step, lambda: init_state(config, optimizer, seed=0, subset=subset, objective=objective)


def measure(config, args, recompute: bool) -> dict:
    step, make_state = _setup(config, recompute)
    base = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    state = jax.eval_shape(make_state)
    shape = (args.batch, args.seq_len)
    ints = jax.ShapeDtypeStruct(shape, jnp.int32)
    batch = Batch(
        tokens=ints, targets=ints, positions=ints, segment_ids=ints, loss_mask=jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    started = time.perf_counter()
    memory = step.lower(state, batch, base).compile().memory_analysis()
    return {
        "layers": config.n_layers,
        "recompute": recompute,
        "temp_gib": round(memory.temp_size_in_bytes / 2**30, 3),
        "arguments_gib": round(memory.argument_size_in_bytes / 2**30, 3),
        "compile_seconds": round(time.perf_counter() - started, 1),
    }


def time_steps(config, args) -> dict:
    """Seconds per step each way, the two alternating so that load changes hit both alike."""
    base = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq_len)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32)
    batch = Batch(
        tokens=tokens,
        targets=jnp.roll(tokens, -1, axis=1),
        positions=jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), shape),
        segment_ids=jnp.ones(shape, jnp.int32),
        loss_mask=jnp.ones(shape, jnp.float32),
    )
    runs = {}
    for name, recompute in (("keep_activations", False), ("recompute", True)):
        step, make_state = _setup(config, recompute)
        state = make_state()
        state, _ = step(state, batch, base)  # compile
        jax.block_until_ready(state)
        runs[name] = [step, state]
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.time_steps):
        for name, run in runs.items():
            started = time.perf_counter()
            run[1], _ = run[0](run[1], batch, base)
            jax.block_until_ready(run[1])
            seconds[name].append(round(time.perf_counter() - started, 2))
            print(name, seconds[name][-1], flush=True)
    return seconds


if __name__ == "__main__":
    main()
