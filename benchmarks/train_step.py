"""One training step of a LoRA adapter on a quantized base: the input gradients of the frozen
packed (int4) or palettized matrices in bf16 (the default on CPUs with AVX512-BF16) against fp32.

    python benchmarks/train_step.py --models smollm2-135m-instruct:int4,smollm2-135m-instruct-3.5bpw \
        --rounds 2 --json benchmarks/results/train_step.json

Each (model, arm) runs in its own process, the arms alternating within each round, so a change
of the machine's load shows in both. A worker compiles ``value_and_grad`` of the SFT objective
(assistant-only cross-entropy, every target learned) for a rank-16 adapter on all seven matrices,
then times ``--repeats`` steps on one fixed batch of random tokens and keeps the best. The fp32
arm replaces ``packed.input_gradient`` by its fp32 form; nothing else differs. Each worker also
saves its adapter gradient, and the report gives the bf16 arm's relative difference from fp32
(the norm of the difference over the norm), which is the accuracy the speed costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(model_spec: str, arm: str, batch: int, seq_len: int, repeats: int, grads_out: str) -> dict:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import afmkit
    from afmkit import kernels
    from afmkit.adapters.lora import LoraConfig
    from afmkit.model import packed, palettized
    from afmkit.train.objectives import assistant_sft
    from afmkit.train.step import Batch, StepConfig, _loss_sums
    from afmkit.train.trainable import LoraWeights

    if arm == "fp32":
        fp32 = packed.input_gradient

        def input_gradient(grad, weight, bf16):
            return fp32(grad, weight, False)

        packed.input_gradient = palettized.input_gradient = input_gradient
    name, _, dtype = model_spec.partition(":")
    model = afmkit.load(name, dtype=dtype or None)
    config = model.config
    subset = LoraWeights(LoraConfig(rank=16, alpha=32.0, dtype="float32"))
    # B at zero would give A no gradient; a random B (as after some training) exercises both
    weights = jax.tree.map(
        lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape, x.dtype) * 0.01,
        subset.init(config, jax.random.PRNGKey(0)),
    )
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq_len)), jnp.int32)
    ones = jnp.ones((batch, seq_len), jnp.int32)
    data = Batch(
        tokens=tokens,
        targets=jnp.roll(tokens, -1, 1),
        positions=jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
        segment_ids=ones,
        loss_mask=ones,
    )

    def loss(w):
        return _loss_sums(
            w,
            data,
            model.params,
            None,
            config=config,
            step_config=StepConfig(),
            subset=subset,
            objective=assistant_sft(),
        )[0]

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    value, grads = jax.block_until_ready(step(weights))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(weights))
        times.append(time.perf_counter() - start)
    flat = np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)])
    np.save(grads_out, flat)
    return {
        "model": model_spec,
        "arm": arm,
        "kernels": kernels.describe(),
        "compile_and_first_s": round(compile_s, 2),
        "step_s": [round(t, 3) for t in times],
        "best_step_s": round(min(times), 3),
        "tokens_per_s": round(batch * seq_len / min(times), 1),
        "loss_per_token": float(value) / (batch * seq_len),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="smollm2-135m-instruct:int4,smollm2-135m-instruct-3.5bpw",
        help="comma-separated NAME[:DTYPE]",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "ARM"), help=argparse.SUPPRESS)
    parser.add_argument("--grads-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.seq_len, args.repeats, args.grads_out)))
        return

    import numpy as np

    from afmkit.kernels import cpu_name

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for model_spec in args.models.split(","):
                arms = ["bf16", "fp32"] if round_ % 2 == 0 else ["fp32", "bf16"]
                for arm in arms:
                    grads = os.path.join(tmp, f"{round_}-{len(runs)}.npy")
                    command = [
                        sys.executable,
                        __file__,
                        "--worker",
                        model_spec,
                        arm,
                        "--grads-out",
                        grads,
                        "--batch",
                        str(args.batch),
                        "--seq-len",
                        str(args.seq_len),
                        "--repeats",
                        str(args.repeats),
                    ]
                    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                    run = json.loads(out.strip().splitlines()[-1]) | {"round": round_, "grads": grads}
                    runs.append(run)
                    print(
                        f"round {round_} {model_spec} {arm}: best step {run['best_step_s']} s, "
                        f"{run['tokens_per_s']} tokens/s",
                        file=sys.stderr,
                    )
        summary = []
        for model_spec in args.models.split(","):
            mine = [r for r in runs if r["model"] == model_spec]
            best = {arm: min(r["best_step_s"] for r in mine if r["arm"] == arm) for arm in ("bf16", "fp32")}
            g16 = np.load(next(r["grads"] for r in mine if r["arm"] == "bf16"))
            g32 = np.load(next(r["grads"] for r in mine if r["arm"] == "fp32"))
            summary.append(
                {
                    "model": model_spec,
                    "best_step_s": best,
                    "speedup_bf16_over_fp32": round(best["fp32"] / best["bf16"], 2),
                    "grad_relative_difference": float(np.linalg.norm(g16 - g32) / np.linalg.norm(g32)),
                    "grad_cosine": float(g16 @ g32 / np.linalg.norm(g16) / np.linalg.norm(g32)),
                }
            )
    for run in runs:
        run.pop("grads")
    report = {
        "benchmark": "train_step",
        "cpu": cpu_name(),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "summary": summary,
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
