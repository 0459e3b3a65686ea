"""Training metrics: FLOPs and MFU estimates, the JSONL log and the loss-curve PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from afmkit.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, matched against ``jax.devices()[0].device_kind`` (lower case).
PEAK_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "tpu v4": 275e12,
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,
    "tpu v6 lite": 918e12,
}


def flops_per_token(config: ModelConfig, *, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): ``6 N`` for the matmul weights (the
    output projection counted, the embedding lookup not) plus ``12 L H d_head T`` for the
    attention scores and mixing (PaLM's estimate, full rather than causal attention)."""
    matmul_params = config.non_embedding_params + config.vocab_size * config.d_model
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6 * matmul_params + attention


def peak_flops_per_device(override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override, else the table's entry, else ``None`` (CPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None


def mfu(*, tokens_per_second: float, config: ModelConfig, seq_len: int, peak_per_device: float | None) -> float | None:
    if not peak_per_device:
        return None
    return tokens_per_second * flops_per_token(config, seq_len=seq_len) / (peak_per_device * jax.device_count())


class MetricsLog:
    """One JSON object per line; on resume, records past the restored step are dropped (those
    steps run again)."""

    def __init__(self, path: str | os.PathLike, *, resume_from_step: int | None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_from_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_from_step]
        with open(self.path, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        self.records = kept

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything before it is good
    return records


def plot_loss(
    records: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str, unit: str = "nats/token"
) -> Path:
    """A PNG of training (and eval, where logged) loss against step; ``unit`` labels the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [r["step"] for r in records if "loss" in r]
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], label="train loss", linewidth=1)
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({unit})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
