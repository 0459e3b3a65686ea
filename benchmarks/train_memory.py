"""Temporary memory of one training step by layer count: XLA's own accounting of the compiled
step (``memory_analysis().temp_size_in_bytes``), so nothing runs and the number does not depend
on the machine's load. LoRA (rank 16, every linear) over a random fp32 base of the chosen size, assistant-
only SFT on ``--batch`` packed rows of ``--seq-len`` tokens (``posttrain sft``'s defaults).

    python benchmarks/train_memory.py --json benchmarks/results/train_memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from afmkit.adapters.lora import LoraConfig
from afmkit.config import get_size
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
    parser.add_argument("--layers", default="2,4,0", help="layer counts to compile (0: the size's own)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    counts = [int(x) for x in args.layers.split(",")]
    if len(counts) < 2:
        parser.error("--layers needs at least two layer counts (the per-layer figure is their difference)")

    rows = []
    for layers in counts:
        config = get_size(args.size)
        config = dataclasses.replace(config, n_layers=layers or config.n_layers)
        rows.append(measure(config, args))
        print(rows[-1], flush=True)
    per_layer = (rows[1]["temp_gib"] - rows[0]["temp_gib"]) / (rows[1]["layers"] - rows[0]["layers"])
    result = {
        "benchmark": "training step temporary memory (XLA's accounting), LoRA SFT",
        "settings": vars(args),
        "rows": rows,
        "temp_gib_per_layer": round(per_layer, 3),
        "machine": {"platform": platform.platform(), "jax": jax.__version__},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def measure(config, args) -> dict:
    base = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    subset = LoraWeights(LoraConfig(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up", "down")))
    objective = assistant_sft()
    opt = OptimizerConfig(name="adamw", peak_lr=1e-4, warmup_steps=1, total_steps=10, weight_decay=0.0)
    optimizer = build_optimizer(opt)
    state = jax.eval_shape(lambda: init_state(config, optimizer, seed=0, subset=subset, objective=objective))
    shape = (args.batch, args.seq_len)
    ints = jax.ShapeDtypeStruct(shape, jnp.int32)
    batch = Batch(
        tokens=ints, targets=ints, positions=ints, segment_ids=ints, loss_mask=jax.ShapeDtypeStruct(shape, jnp.float32)
    )
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
    started = time.perf_counter()
    memory = step.lower(state, batch, base).compile().memory_analysis()
    return {
        "layers": config.n_layers,
        "temp_gib": round(memory.temp_size_in_bytes / 2**30, 3),
        "arguments_gib": round(memory.argument_size_in_bytes / 2**30, 3),
        "compile_seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    main()
