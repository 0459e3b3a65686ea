"""The training state and the pure, jitted ``train_step``.

``train_step(state, batch) -> (state, metrics)`` runs forward and backward (over microbatches
when accumulating), clips, applies the optimizer and returns scalar metrics. It is compiled with
explicit in/out shardings (weights and optimizer state laid out by the logical-axis rules, the
batch split over ``data``+``fsdp`` and ``seq``) and donates the old state, so a step needs one
copy of the weights and optimizer state, not two.

Master weights and optimizer state are fp32; ``compute_dtype`` (bf16 on accelerators) is what
the matmuls and activations run in, the weights being cast inside the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.model.transformer import Params, abstract_params, cross_entropy_loss, forward, init_params, output_logits
from afmkit.sharding.activations import activation_sharding, constrain
from afmkit.sharding.plan import param_shardings
from afmkit.sharding.rules import resolve


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params  # fp32 master weights
    opt_state: Any
    rng: jax.Array  # uint32 [2]: a raw PRNG key, split once per step

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """One global batch of packed rows, each field ``[B, T]`` (``[A, B/A, T]`` when accumulating)."""

    tokens: jax.Array  # int32 inputs
    targets: jax.Array  # int32 next tokens
    positions: jax.Array  # int32, restarting at 0 for each packed document
    segment_ids: jax.Array  # int32, one id per document in a row; 0 = padding
    loss_mask: jax.Array  # float32, 1 where the target belongs to the same document


BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(Batch))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    accum_steps: int = 1
    compute_dtype: Any = jnp.float32


def init_state(config: ModelConfig, optimizer: optax.GradientTransformation, *, seed: int) -> TrainState:
    """Fresh fp32 weights and optimizer state (unsharded; see ``init_sharded_state``)."""
    params_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(config, params_key, jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)


def abstract_state(config: ModelConfig, optimizer: optax.GradientTransformation) -> TrainState:
    params = abstract_params(config, jnp.float32)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(optimizer.init, params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )


def state_shardings(config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Weights by the rule table; optimizer slots shaped like weights follow their weight;
    counters and the RNG are replicated."""
    weights = param_shardings(config, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state(config, optimizer).opt_state,
        weights,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(step=replicated, params=weights, opt_state=opt, rng=replicated)


def init_sharded_state(
    config: ModelConfig, optimizer: optax.GradientTransformation, shardings: TrainState, *, seed: int
) -> TrainState:
    """Initialise directly into the sharded layout (no device ever holds the whole model)."""
    return jax.jit(functools.partial(init_state, config, optimizer, seed=seed), out_shardings=shardings)()


def batch_sharding(mesh: Mesh, *, shape: tuple[int, ...]) -> NamedSharding:
    axes = ("batch", "seq") if len(shape) == 2 else ("microbatch", "batch", "seq")
    return NamedSharding(mesh, resolve(axes, shape, mesh, name=f"batch {shape}"))


def check_batch_layout(mesh: Mesh, *, batch: int, seq_len: int, accum_steps: int) -> None:
    """Clear errors for a batch the mesh or accumulation cannot split."""
    if accum_steps < 1 or batch % accum_steps:
        raise UserError(f"--accum {accum_steps} must divide the batch of {batch} rows")
    batch_sharding(mesh, shape=(accum_steps, batch // accum_steps, seq_len))


def _loss_sums(
    params: Params, batch: Batch, *, config: ModelConfig, step_config: StepConfig
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Summed (not averaged) loss over the batch's target tokens, so microbatches add up exactly."""
    compute = step_config.compute_dtype
    if compute != jnp.float32:
        params = jax.tree.map(lambda w: w.astype(compute), params)
    hidden, _ = forward(
        params,
        batch.tokens,
        batch.positions,
        None,
        config=config,
        activation_dtype=compute,
        segment_ids=batch.segment_ids,
    )
    logits = constrain(output_logits(params, hidden), ("batch", "seq", "act_vocab"))
    loss, parts = cross_entropy_loss(logits, batch.targets, batch.loss_mask, z_loss=config.z_loss)
    count = batch.loss_mask.astype(jnp.float32).sum()
    total = loss * count
    return total, (parts["cross_entropy"] * count, count)


def train_step_fn(
    state: TrainState,
    batch: Batch,
    *,
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    step_config: StepConfig,
    mesh: Mesh | None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (unjitted; ``make_train_step`` compiles it)."""
    with activation_sharding(mesh) if mesh is not None else contextlib.nullcontext():
        grad_fn = jax.value_and_grad(
            functools.partial(_loss_sums, config=config, step_config=step_config), has_aux=True
        )
        if step_config.accum_steps == 1:
            (loss_sum, (ce_sum, count)), grads = grad_fn(state.params, batch)
        else:

            def microbatch(carry: Any, mb: Batch) -> tuple[Any, None]:
                grads_acc, loss_acc, ce_acc, count_acc = carry
                (loss, (ce, n)), grads = grad_fn(state.params, mb)
                return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss, ce_acc + ce, count_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            scalar = jnp.zeros((), jnp.float32)
            (grads, loss_sum, ce_sum, count), _ = jax.lax.scan(microbatch, (zeros, scalar, scalar, scalar), batch)
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss = loss_sum / denominator
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    # A non-finite step leaves the state as it was; the loop sees `finite` and stops.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {
        "loss": loss,
        "cross_entropy": ce_sum / denominator,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "tokens": count,
        "finite": finite,
    }
    return new_state, metrics


def make_train_step(
    *,
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    step_config: StepConfig,
    mesh: Mesh,
    shardings: TrainState,
    batch_shape: tuple[int, ...],
) -> Any:
    """``train_step(state, batch)`` compiled for ``mesh`` with the state donated."""
    data = batch_sharding(mesh, shape=batch_shape)
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = functools.partial(
        train_step_fn, config=config, optimizer=optimizer, schedule=schedule, step_config=step_config, mesh=mesh
    )
    return jax.jit(
        fn,
        in_shardings=(shardings, Batch(*[data] * len(BATCH_FIELDS))),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def local_batch_positions(mesh: Mesh, *, global_rows: int, seq_len: int, accum_steps: int) -> np.ndarray:
    """Which rows of the global batch this process's devices hold, in the order
    ``global_batch`` expects them (microbatch-major when accumulating)."""
    shape = (global_rows, seq_len) if accum_steps == 1 else (accum_steps, global_rows // accum_steps, seq_len)
    sharding = batch_sharding(mesh, shape=shape)
    row_dim = len(shape) - 2
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows = index[row_dim]
        starts.append(rows.start or 0)
        stops.append(shape[row_dim] if rows.stop is None else rows.stop)
    start, stop = min(starts), max(stops)
    if accum_steps == 1:
        return np.arange(start, stop)
    per_micro = shape[1]
    return np.concatenate([a * per_micro + np.arange(start, stop) for a in range(accum_steps)])


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, *, global_rows: int, accum_steps: int) -> Batch:
    """A global ``Batch`` from this process's rows (``local_batch_positions``; all rows when
    there is one process)."""
    fields = {}
    for name in BATCH_FIELDS:
        array = local[name]
        seq = array.shape[-1]
        shape = (global_rows, seq) if accum_steps == 1 else (accum_steps, global_rows // accum_steps, seq)
        if accum_steps > 1:
            array = array.reshape(accum_steps, -1, seq)
        sharding = batch_sharding(mesh, shape=shape)
        fields[name] = jax.make_array_from_process_local_data(sharding, array, shape)
    return Batch(**fields)


def make_eval_step(
    *, config: ModelConfig, step_config: StepConfig, mesh: Mesh, shardings: TrainState, batch_shape: tuple[int, ...]
) -> Any:
    """``eval_step(params, batch) -> mean loss`` (cross-entropy only), compiled for ``mesh``."""

    def eval_fn(params: Params, batch: Batch) -> jax.Array:
        with activation_sharding(mesh):
            _, (ce_sum, count) = _loss_sums(params, batch, config=config, step_config=step_config)
        return ce_sum / jnp.maximum(count, 1.0)

    data = batch_sharding(mesh, shape=batch_shape)
    return jax.jit(
        eval_fn,
        in_shardings=(shardings.params, Batch(*[data] * len(BATCH_FIELDS))),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )
