"""Sharded equals unsharded: the same 5 training steps on several 8-device meshes and on one
device give the same per-step losses (fp32, 1e-4 relative)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.config import get_size
from afmkit.sharding.mesh import make_mesh
from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule
from afmkit.train.step import (
    Batch,
    StepConfig,
    global_batch,
    init_sharded_state,
    init_state,
    make_train_step,
    state_shardings,
    train_step_fn,
)

CONFIG = get_size("test-tiny")
BATCH, SEQ, STEPS = 8, 32, 5


def packed_batches(seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random rows, each holding two or three packed documents."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(STEPS):
        tokens = rng.integers(0, CONFIG.vocab_size, size=(BATCH, SEQ + 1), dtype=np.int32)
        segments = np.ones((BATCH, SEQ + 1), np.int32)
        positions = np.tile(np.arange(SEQ + 1, dtype=np.int32), (BATCH, 1))
        for row in range(BATCH):
            for cut in sorted(rng.choice(np.arange(4, SEQ - 4), size=rng.integers(1, 3), replace=False)):
                segments[row, cut:] += 1
                positions[row, cut:] = np.arange(SEQ + 1 - cut)
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "positions": positions[:, :-1],
                "segment_ids": segments[:, :-1],
                "loss_mask": (segments[:, 1:] == segments[:, :-1]).astype(np.float32),
            }
        )
    return batches


def optimizer_config():
    return OptimizerConfig(name="adamw", peak_lr=1e-2, warmup_steps=2, total_steps=STEPS, weight_decay=0.1)


def unsharded_losses(batches, *, accum_steps=1):
    opt_config = optimizer_config()
    optimizer = build_optimizer(opt_config)
    step = jax.jit(
        lambda s, b: train_step_fn(
            s,
            b,
            config=CONFIG,
            optimizer=optimizer,
            schedule=lr_schedule(opt_config),
            step_config=StepConfig(accum_steps=accum_steps),
            mesh=None,
        )
    )
    state = jax.device_put(init_state(CONFIG, optimizer, seed=0), jax.devices()[0])
    losses = []
    for b in batches:
        fields = {k: jnp.asarray(v.reshape(accum_steps, -1, SEQ) if accum_steps > 1 else v) for k, v in b.items()}
        state, metrics = step(state, Batch(**fields))
        losses.append(float(metrics["loss"]))
    return losses, state


def sharded_losses(batches, mesh_spec, *, accum_steps=1):
    opt_config = optimizer_config()
    optimizer = build_optimizer(opt_config)
    mesh = make_mesh(mesh_spec)
    shardings = state_shardings(CONFIG, optimizer, mesh)
    shape = (BATCH, SEQ) if accum_steps == 1 else (accum_steps, BATCH // accum_steps, SEQ)
    step = make_train_step(
        config=CONFIG,
        optimizer=optimizer,
        schedule=lr_schedule(opt_config),
        step_config=StepConfig(accum_steps=accum_steps),
        mesh=mesh,
        shardings=shardings,
        batch_shape=shape,
    )
    state = init_sharded_state(CONFIG, optimizer, shardings, seed=0)
    losses = []
    for b in batches:
        state, metrics = step(state, global_batch(b, mesh, global_rows=BATCH, accum_steps=accum_steps))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def reference():
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    batches = packed_batches()
    losses, _ = unsharded_losses(batches)
    return batches, losses


@pytest.mark.parametrize("mesh_spec", ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=2,seq=2,tensor=2"])
def test_sharded_losses_equal_unsharded(reference, mesh_spec):
    batches, expected = reference
    losses, state = sharded_losses(batches, mesh_spec)
    assert expected[-1] < expected[0], "the loss should fall over 5 steps at this learning rate"
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
    # the layout really is sharded: fsdp/tensor meshes split the embedding table
    if "fsdp" in mesh_spec or "tensor" in mesh_spec:
        embed = state.params["embed"]
        assert embed.addressable_shards[0].data.size < embed.size


def test_gradient_accumulation_equals_full_batch(reference):
    batches, expected = reference
    losses, _ = unsharded_losses(batches, accum_steps=4)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    sharded, _ = sharded_losses(batches, "data=2,fsdp=2,tensor=2", accum_steps=2)
    np.testing.assert_allclose(sharded, expected, rtol=1e-4)
