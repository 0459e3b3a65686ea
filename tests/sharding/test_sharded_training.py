"""Sharded equals unsharded: the same 5 training steps on several 8-device meshes and on one
device give the same per-step losses (fp32, 1e-4 relative), with AdamW and with AFM's
RMSProp-momentum optimizer; and under sequence parallelism the compiled program keeps the
queries split along the sequence."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.config import get_size
from afmkit.model.transformer import cross_entropy_loss, forward, init_params, output_logits
from afmkit.sharding.activations import activation_sharding
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


def optimizer_config(name="adamw"):
    # AFM's own peak LR and decay (AFM_SPEC section 3) for its optimizer
    if name == "afm":
        return OptimizerConfig(name="afm", peak_lr=1e-2, warmup_steps=2, total_steps=STEPS, weight_decay=3.16e-4)
    return OptimizerConfig(name="adamw", peak_lr=1e-2, warmup_steps=2, total_steps=STEPS, weight_decay=0.1)


def unsharded_losses(batches, *, accum_steps=1, optimizer_name="adamw"):
    opt_config = optimizer_config(optimizer_name)
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


def sharded_losses(batches, mesh_spec, *, accum_steps=1, optimizer_name="adamw"):
    opt_config = optimizer_config(optimizer_name)
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


def test_afm_optimizer_sharded_equals_unsharded(reference):
    batches, _ = reference
    expected, _ = unsharded_losses(batches, optimizer_name="afm")
    losses, state = sharded_losses(batches, "data=2,fsdp=2,tensor=2", optimizer_name="afm")
    assert expected[-1] < expected[0], "AFM's optimizer at its peak LR should lower the loss over 5 steps"
    # The same bound as AdamW: both divide the gradient by the root of its running square, so a
    # reduction order that differs by fp32 rounding (~1e-7 relative per sum) moves each update by
    # about as much, and 5 steps of it stay well inside 1e-4 of the loss.
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
    # the optimizer's slots are sharded like the weights
    slots = [leaf for leaf in jax.tree.leaves(state.opt_state) if getattr(leaf, "ndim", 0) == 2]
    assert slots and all(leaf.addressable_shards[0].data.size < leaf.size for leaf in slots)


def test_sequence_parallel_attention_keeps_queries_split_by_sequence():
    """Read the layout from the compiled program: on fsdp=2,seq=2,tensor=2 every attention score
    block one device computes must cover its half of the queries (T/2 rows) against all keys
    (T columns), never all queries against half the keys."""
    mesh = make_mesh("fsdp=2,seq=2,tensor=2")
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    batch = packed_batches()[0]

    def loss(params, tokens, targets, positions, segment_ids):
        with activation_sharding(mesh):
            hidden, _ = forward(params, tokens, positions, None, config=CONFIG, segment_ids=segment_ids)
            return cross_entropy_loss(output_logits(params, hidden), targets, z_loss=CONFIG.z_loss)[0]

    data = global_batch(batch, mesh, global_rows=BATCH, accum_steps=1)
    text = jax.jit(loss).lower(params, data.tokens, data.targets, data.positions, data.segment_ids).compile().as_text()
    # the scaled scores (inside the model's "attention_scores" scope), forward pass only
    shapes = {
        tuple(int(n) for n in m.group(1).split(","))
        for m in re.finditer(r"= f32\[([\d,]+)\]\S* \w+\(.*op_name=\"jit\(loss\)/attention_scores/div\"", text)
    }
    assert shapes, "no attention scores found in the compiled program"
    groups = CONFIG.n_heads // CONFIG.n_kv_heads
    # every block: all keys as columns, and a quarter of the batch x heads x queries as rows
    # (batch / fsdp, kv_heads / tensor, queries / seq); the 3-d form is the same block with
    # its row axes merged. Gathered queries against split keys would show [.., SEQ // 2].
    rows = (BATCH // 2) * (CONFIG.n_kv_heads // 2) * groups * (SEQ // 2)
    assert all(shape[-1] == SEQ and np.prod(shape[:-1]) == rows for shape in shapes), shapes
    assert (BATCH // 2, CONFIG.n_kv_heads // 2, groups, SEQ // 2, SEQ) in shapes, shapes
