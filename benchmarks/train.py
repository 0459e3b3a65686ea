"""Training throughput: afmkit's sharded ``train_step`` vs a plain PyTorch implementation of the
same model, side by side in one run.

Both engines train the same architecture (AFM: pre-norm RMSNorm, GQA with RoPE and q/k RMSNorm,
SwiGLU, tied embedding, z-loss) at the same batch and sequence length, fp32 weights, AdamW with
global-norm clipping at 1. afmkit runs its real ``train_step`` (jitted, donated state, one
device on CPU); the PyTorch model is written here from the same equations (``F.scaled_dot_product_attention``
with GQA, ``torch.optim.AdamW``). Rows hold one document each, so afmkit's segment mask and
torch's causal mask select the same keys.

The engines alternate (``--rounds`` rounds of ``--steps`` timed steps each, after warm-up
steps) so that load from other processes hits both alike; the reported step time is the
median over all timed steps of an engine.

    python benchmarks/train.py                      # ~20M model on this machine's CPU, JSON out
    python benchmarks/train.py --size bench-1b --compute-dtype bfloat16 --engines afmkit   # one GPU

``--size`` is a registry size (``afmkit info``) or one of this script's sizes: ``bench-20m``
(~19M parameters) and ``bench-1b`` (~1.1B, for an H200). On an accelerator the script runs
unchanged (JAX and torch pick the device); MFU is reported where the device's peak FLOP/s is
known (``afmkit.train.metrics.PEAK_FLOPS`` or ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

from afmkit.config import ModelConfig, get_size

BENCH_SIZES = {
    "bench-20m": ModelConfig(
        name="bench-20m",
        vocab_size=16_384,
        d_model=384,
        n_layers=6,
        n_heads=6,
        n_kv_heads=2,
        head_dim=64,
        d_ff=1536,
        qk_norm=True,
        max_seq_len=1024,
    ),
    "bench-1b": ModelConfig(
        name="bench-1b",
        vocab_size=49_152,
        d_model=2048,
        n_layers=18,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        d_ff=5632,
        qk_norm=True,
        max_seq_len=4096,
    ),
}


WEIGHT_DECAY = 3.16e-4


def model_config(name: str) -> ModelConfig:
    return BENCH_SIZES[name] if name in BENCH_SIZES else get_size(name)


def make_batch(config: ModelConfig, *, batch: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq_len + 1), dtype=np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }


# -- afmkit -----------------------------------------------------------------------------------
class AfmkitEngine:
    name = "afmkit"

    def __init__(self, config: ModelConfig, batch: dict[str, np.ndarray], *, compute_dtype: str, lr: float) -> None:
        import jax
        import jax.numpy as jnp

        from afmkit.sharding.mesh import make_mesh
        from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule
        from afmkit.train.step import (
            StepConfig,
            global_batch,
            init_sharded_state,
            make_train_step,
            state_shardings,
        )

        opt_config = OptimizerConfig(
            name="adamw", peak_lr=lr, warmup_steps=0, total_steps=10_000, weight_decay=WEIGHT_DECAY
        )
        optimizer = build_optimizer(opt_config)
        mesh = make_mesh("data=1", devices=jax.devices()[:1])
        shardings = state_shardings(config, optimizer, mesh)
        self.state = init_sharded_state(config, optimizer, shardings, seed=0)
        rows, seq = batch["tokens"].shape
        self.step = make_train_step(
            config=config,
            optimizer=optimizer,
            schedule=lr_schedule(opt_config),
            # Activations kept, as the PyTorch side keeps them (no recomputation): the same work.
            step_config=StepConfig(
                compute_dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[compute_dtype], recompute=False
            ),
            mesh=mesh,
            shardings=shardings,
            batch_shape=(rows, seq),
        )
        self.batch = global_batch(batch, mesh, global_rows=rows, accum_steps=1)
        self.device = str(jax.devices()[0].device_kind)

    def run(self) -> float:
        self.state, metrics = self.step(self.state, self.batch)
        return float(metrics["loss"])  # waits for the step


# -- PyTorch ----------------------------------------------------------------------------------
def torch_model(config: ModelConfig):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps))

    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(half, dtype=torch.float32) / half))

    def rope(x, cos, sin):  # x: [B, H, T, D], half-split layout
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d, h, kv, hd, f = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff
            self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
            self.wq = nn.Linear(d, h * hd, bias=False)
            self.wk = nn.Linear(d, kv * hd, bias=False)
            self.wv = nn.Linear(d, kv * hd, bias=False)
            self.wo = nn.Linear(h * hd, d, bias=False)
            self.q_norm, self.k_norm = RMSNorm(hd), RMSNorm(hd)
            self.w_gate = nn.Linear(d, f, bias=False)
            self.w_up = nn.Linear(d, f, bias=False)
            self.w_down = nn.Linear(f, d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            hd = config.head_dim
            y = self.attn_norm(x)
            q = self.q_norm(self.wq(y).view(b, t, config.n_heads, hd)).transpose(1, 2)
            k = self.k_norm(self.wk(y).view(b, t, config.n_kv_heads, hd)).transpose(1, 2)
            v = self.wv(y).view(b, t, config.n_kv_heads, hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.wo(out.transpose(1, 2).reshape(b, t, -1))
            y = self.mlp_norm(x)
            return x + self.w_down(F.silu(self.w_gate(y)) * self.w_up(y))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
            nn.init.normal_(self.embed.weight, std=1 / math.sqrt(config.d_model))
            self.blocks = nn.ModuleList(Block() for _ in range(config.n_layers))
            self.final_norm = RMSNorm(config.d_model)

        def forward(self, tokens, targets):
            t = tokens.shape[1]
            angles = torch.arange(t, dtype=torch.float32, device=tokens.device)[:, None] * inv_freq.to(tokens.device)
            cos, sin = angles.cos(), angles.sin()
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x, cos, sin)
            logits = self.final_norm(x) @ self.embed.weight.T  # tied embedding
            log_z = torch.logsumexp(logits.float(), dim=-1)
            nll = log_z - logits.gather(-1, targets[..., None])[..., 0]
            return nll.mean() + config.z_loss * log_z.pow(2).mean()

    return Model()


class TorchEngine:
    name = "torch"

    def __init__(self, config: ModelConfig, batch: dict[str, np.ndarray], *, compute_dtype: str, lr: float) -> None:
        import torch

        torch.manual_seed(0)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = torch_model(config).to(self.device)
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            # torch multiplies the decay by the LR; afmkit's is decoupled from it (see afmkit.train.optim)
            [{"params": decay, "weight_decay": WEIGHT_DECAY / lr}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        self.tokens = torch.as_tensor(batch["tokens"], dtype=torch.long, device=self.device)
        self.targets = torch.as_tensor(batch["targets"], dtype=torch.long, device=self.device)
        self.autocast = compute_dtype == "bfloat16"

    def run(self) -> float:
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(self.tokens, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return float(loss.detach())  # waits for the step


ENGINES = {"afmkit": AfmkitEngine, "torch": TorchEngine}


def log(line: str) -> None:
    """Progress on stderr (the JSON result is stdout's only line): a run cut off by a time limit
    still says how far it got."""
    print(line, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="bench-20m", help="bench-20m, bench-1b or a registry size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--engines", default="afmkit,torch", help="comma-separated: afmkit, torch")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per engine per round (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per engine first (compilation)")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU (default: table)")
    args = parser.parse_args()

    from afmkit.train.metrics import flops_per_token, peak_flops_per_device

    config = model_config(args.size)
    batch = make_batch(config, batch=args.batch, seq_len=args.seq_len, seed=0)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    engines = {}
    for name in names:
        start = time.perf_counter()
        engines[name] = ENGINES[name](config, batch, compute_dtype=args.compute_dtype, lr=args.lr)
        log(f"{name}: initialised in {time.perf_counter() - start:.1f} s")
    first_losses = {}
    for name, engine in engines.items():
        start = time.perf_counter()
        first_losses[name] = engine.run()
        log(f"{name}: first step (compiles) in {time.perf_counter() - start:.1f} s")
        for _ in range(args.warmup - 1):
            engine.run()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                engine.run()
                times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq_len
    flops = flops_per_token(config, seq_len=args.seq_len) * tokens
    peak = peak_flops_per_device(args.peak_tflops)
    results: dict[str, Any] = {
        "benchmark": "train",
        "size": config.name,
        "params": config.total_params,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "compute_dtype": args.compute_dtype,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "engines": {},
    }
    for name in names:
        median = statistics.median(times[name])
        results["engines"][name] = {
            "median_step_s": round(median, 4),
            "min_step_s": round(min(times[name]), 4),
            "max_step_s": round(max(times[name]), 4),
            "tokens_per_s": round(tokens / median, 1),
            "mfu": round(flops / median / peak, 4) if peak else None,
            "first_loss": round(first_losses[name], 4),
            "device": getattr(engines[name], "device", "cpu"),
        }
    if {"afmkit", "torch"} <= set(names):
        results["afmkit_over_torch"] = round(
            results["engines"]["afmkit"]["tokens_per_s"] / results["engines"]["torch"]["tokens_per_s"], 3
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
