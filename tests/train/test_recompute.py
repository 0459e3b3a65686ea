"""Recomputing each layer in the backward pass (``StepConfig.recompute``, on by default): the
same training step as keeping the activations, and a compiled step whose memory grows by one
``[rows, seq, d_model]`` array per layer instead of by the layer's activations."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.adapters.lora import LoraConfig
from afmkit.config import get_size
from afmkit.model.transformer import init_params
from afmkit.train.objectives import assistant_sft
from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule
from afmkit.train.step import Batch, StepConfig, init_state, train_step_fn
from afmkit.train.trainable import FULL, LoraWeights

CONFIG = get_size("test-tiny")
LORA = LoraWeights(LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down")))
OPT = OptimizerConfig(name="adamw", peak_lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.0)


def _step(config, subset, recompute: bool, dropout: float = 0.0):
    optimizer = build_optimizer(OPT)
    step = jax.jit(
        lambda s, b, f: train_step_fn(
            s,
            b,
            f,
            config=config,
            optimizer=optimizer,
            schedule=lr_schedule(OPT),
            step_config=StepConfig(recompute=recompute, dropout=dropout),
            mesh=None,
            subset=subset,
            objective=assistant_sft(),
        )
    )
    return step, lambda: init_state(config, optimizer, seed=0, subset=subset, objective=assistant_sft())


def _batch(rows: int, seq: int, vocab: int) -> Batch:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (rows, seq + 1), dtype=np.int32)
    half = seq // 2  # two packed documents per row, positions restarting at the second
    positions = np.concatenate([np.arange(half), np.arange(seq - half)]).astype(np.int32)
    segments = np.concatenate([np.full(half, 1), np.full(seq - half, 2)]).astype(np.int32)
    return Batch(
        tokens=jnp.asarray(tokens[:, :-1]),
        targets=jnp.asarray(tokens[:, 1:]),
        positions=jnp.tile(jnp.asarray(positions), (rows, 1)),
        segment_ids=jnp.tile(jnp.asarray(segments), (rows, 1)),
        loss_mask=jnp.asarray(rng.random((rows, seq)) > 0.3, jnp.float32),
    )


def test_recomputed_step_equals_the_step_that_keeps_activations():
    # LoRA with dropout (the mask must be redrawn identically when recomputed) and full
    # fine-tuning, over packed rows, three steps each.
    base = init_params(CONFIG, jax.random.PRNGKey(1))
    batch = _batch(2, 32, CONFIG.vocab_size)
    for subset, frozen, dropout in ((LORA, base, 0.1), (FULL, None, 0.0)):
        results = {}
        for recompute in (False, True):
            step, make_state = _step(CONFIG, subset, recompute, dropout)
            state, losses = make_state(), []
            for _ in range(3):
                state, metrics = step(state, batch, frozen)
                losses.append(float(metrics["loss"]))
            results[recompute] = (losses, state.params)
        # The same operations on the same values; only how XLA fuses them may differ, which moves
        # fp32 results by a few ulps per operation (2^-24 relative) through ~50 ops of depth and
        # three Adam steps, whose normalised update amplifies differences in tiny gradients.
        np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
        for kept, recomputed in zip(jax.tree.leaves(results[False][1]), jax.tree.leaves(results[True][1])):
            np.testing.assert_allclose(recomputed, kept, rtol=1e-4, atol=1e-6)


def _temp_bytes(layers: int, recompute: bool) -> int:
    config = dataclasses.replace(CONFIG, d_model=128, d_ff=512, n_heads=8, n_kv_heads=2, n_layers=layers)
    step, make_state = _step(config, LORA, recompute)
    base = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    shape = (ROWS, SEQ)
    ints = jax.ShapeDtypeStruct(shape, jnp.int32)
    batch = Batch(ints, ints, ints, ints, jax.ShapeDtypeStruct(shape, jnp.float32))
    compiled = step.lower(jax.eval_shape(make_state), batch, base).compile()
    return compiled.memory_analysis().temp_size_in_bytes


ROWS, SEQ = 4, 256


def test_recomputing_keeps_one_residual_array_per_layer():
    residual = ROWS * SEQ * 128 * 4  # one fp32 [rows, seq, d_model] array: 0.5 MiB
    kept = (_temp_bytes(6, False) - _temp_bytes(2, False)) / 4
    recomputed = (_temp_bytes(6, True) - _temp_bytes(2, True)) / 4
    # Keeping activations: at least the MLP's gate, up and their product, [rows, seq, d_ff]
    # each (4 MiB together with d_ff = 4 d_model), plus attention's scores.
    assert kept >= 3 * ROWS * SEQ * 512 * 4
    # Recomputing: the layer's input (the residual), plus the layer's LoRA weights, their
    # gradients and Adam moments (well under one residual at rank 4).
    assert recomputed <= 2 * residual
