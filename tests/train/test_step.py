"""bf16 compute with fp32 master weights: the step runs in bf16, the state stays fp32, and the
loss tracks the fp32 step closely."""

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.config import get_size
from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule
from afmkit.train.step import Batch, StepConfig, init_state, train_step_fn

CONFIG = get_size("test-tiny")


def test_bf16_compute_keeps_fp32_master_weights():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (2, 17), dtype=np.int32)
    batch = Batch(
        tokens=jnp.asarray(tokens[:, :-1]),
        targets=jnp.asarray(tokens[:, 1:]),
        positions=jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1)),
        segment_ids=jnp.ones((2, 16), jnp.int32),
        loss_mask=jnp.ones((2, 16), jnp.float32),
    )
    opt_config = OptimizerConfig(peak_lr=1e-2, warmup_steps=0, total_steps=3)
    optimizer = build_optimizer(opt_config)
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        step = jax.jit(
            lambda s, b, dtype=dtype: train_step_fn(
                s,
                b,
                config=CONFIG,
                optimizer=optimizer,
                schedule=lr_schedule(opt_config),
                step_config=StepConfig(compute_dtype=dtype),
                mesh=None,
            )
        )
        state = init_state(CONFIG, optimizer, seed=0)
        losses[dtype] = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses[dtype].append(float(metrics["loss"]))
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
        assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(state.opt_state))
    np.testing.assert_allclose(losses[jnp.bfloat16], losses[jnp.float32], rtol=2e-2)
    assert losses[jnp.bfloat16] != losses[jnp.float32], "bf16 compute really ran in bf16"
