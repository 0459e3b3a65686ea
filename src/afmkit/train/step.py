"""The training state and the pure, jitted ``train_step``: the one training loop of afmkit.

``train_step(state, batch) -> (state, metrics)`` runs forward and backward (over microbatches
when accumulating), clips, applies the optimizer and returns scalar metrics. Two arguments make
it every trainer afmkit has:

* the **objective** (``train.objectives``): a loss over a batch and the model's outputs,
  returned as a sum plus a ``count`` so that microbatches add up exactly (next-token for
  pre-training, assistant-only SFT, the reward model, the sequence-level policy losses);
* the **trainable subset** (``train.trainable``): all weights, or a LoRA adapter over a frozen
  base (float or packed int4). ``state.params`` holds only what is trained; the frozen base is a
  separate, never differentiated and never donated argument of the compiled step.

The step is compiled with explicit in/out shardings (weights and optimizer state laid out by the
logical-axis rules, the batch split over ``data``+``fsdp`` and ``seq``) and donates the old
state, so a step needs one copy of the trainable weights and optimizer state, not two.

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
from afmkit.model.transformer import Params
from afmkit.sharding.activations import activation_sharding
from afmkit.sharding.rules import resolve
from afmkit.train.objectives import ModelView, Objective, default_batch_axes, next_token
from afmkit.train.trainable import FULL, FullWeights, LoraWeights, cast_floats

Subset = FullWeights | LoraWeights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params  # fp32 master copy of what is trained (see ``trainable_tree``)
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
    loss_mask: jax.Array  # float32, 1 where the target is learned (same document; SFT: the assistant's)


BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(Batch))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    accum_steps: int = 1
    compute_dtype: Any = jnp.float32
    dropout: float = 0.0  # residual dropout while training (AFM's SFT: 0.1); evaluation never drops
    # Recompute each layer's activations in the backward pass rather than keep them all: the
    # step's memory then grows by one [batch, seq, d_model] array per layer (SmolLM2 LoRA SFT at
    # 8 x 512 tokens: 0.84 GiB of temporaries instead of 11.4) for one more forward pass.
    recompute: bool = True


def _resolve_objective(config: ModelConfig, objective: Objective | None) -> Objective:
    return next_token(config) if objective is None else objective


def trainable_tree(subset_tree: Any, extra: Any) -> Any:
    """What ``state.params`` holds: the subset's weights, plus the objective's own parameters (a
    reward model's heads) when it has any. Without extras the tree is the subset's alone, so
    pre-training's checkpoints keep their layout."""
    return subset_tree if extra is None else {"weights": subset_tree, "extra": extra}


def split_trainable(params: Any, objective: Objective) -> tuple[Any, Any]:
    return (params["weights"], params["extra"]) if objective.has_extra else (params, None)


def init_state(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    *,
    seed: int,
    subset: Subset = FULL,
    objective: Objective | None = None,
    initial: Any = None,
) -> TrainState:
    """Fresh fp32 trainable weights (or ``initial``: a pretrained model's weights for full
    fine-tuning) and optimizer state (unsharded; see ``init_sharded_state``)."""
    objective = _resolve_objective(config, objective)
    params_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    weights = (
        subset.init(config, params_key)
        if initial is None
        else jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), initial)
    )
    extra = objective.init_extra(config, jax.random.fold_in(params_key, 1)) if objective.has_extra else None
    params = trainable_tree(weights, extra)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)


def abstract_state(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    *,
    subset: Subset = FULL,
    objective: Objective | None = None,
) -> TrainState:
    objective = _resolve_objective(config, objective)
    extra = (
        jax.eval_shape(functools.partial(objective.init_extra, config), jax.random.PRNGKey(0))
        if objective.has_extra
        else None
    )
    params = trainable_tree(subset.abstract(config), extra)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(optimizer.init, params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )


def state_shardings(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    subset: Subset = FULL,
    objective: Objective | None = None,
) -> TrainState:
    """Weights by the rule table (a LoRA adapter and an objective's heads are small: replicated);
    optimizer slots shaped like weights follow their weight; counters and the RNG are replicated."""
    objective = _resolve_objective(config, objective)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = abstract_state(config, optimizer, subset=subset, objective=objective)
    _, abstract_extra = split_trainable(abstract.params, objective)
    extra = jax.tree.map(lambda _: replicated, abstract_extra) if objective.has_extra else None
    weights = trainable_tree(subset.shardings(config, mesh), extra)
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract.opt_state,
        weights,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(step=replicated, params=weights, opt_state=opt, rng=replicated)


def init_sharded_state(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    *,
    seed: int,
    subset: Subset = FULL,
    objective: Objective | None = None,
    initial: Any = None,
) -> TrainState:
    """Initialise directly into the sharded layout (no device ever holds the whole model)."""
    fn = functools.partial(init_state, config, optimizer, seed=seed, subset=subset, objective=objective)
    return jax.jit(lambda initial: fn(initial=initial), out_shardings=shardings)(initial)


def batch_sharding(mesh: Mesh, *, shape: tuple[int, ...], axes: tuple[str | None, ...] | None = None) -> NamedSharding:
    """A batch field's layout. ``axes``: the logical axes of one global batch's field (rows
    first, from the objective's ``batch_axes``; default ``("batch", "seq")``); a leading
    microbatch axis is added when ``shape`` has one more dimension (accumulating)."""
    axes = ("batch", "seq") if axes is None else tuple(axes)
    if len(shape) == len(axes) + 1:
        axes = ("microbatch", *axes)
    return NamedSharding(mesh, resolve(axes, shape, mesh, name=f"batch {shape}"))


def batch_shardings(mesh: Mesh, example: Any, *, objective: Objective, accum_steps: int) -> Any:
    """The layout of every field of a global batch like ``example`` (a pytree of arrays or
    ``ShapeDtypeStruct``s, ``[A, B/A, ...]`` when accumulating)."""

    def one(path: Any, leaf: Any) -> NamedSharding:
        rank = len(leaf.shape) - (1 if accum_steps > 1 else 0)
        return batch_sharding(mesh, shape=tuple(leaf.shape), axes=objective.batch_axes(_field_name(path), rank))

    return jax.tree_util.tree_map_with_path(one, example)


def _field_name(path: Any) -> str:
    last = path[-1] if path else None
    return str(getattr(last, "name", getattr(last, "key", last)))


def check_batch_layout(mesh: Mesh, *, batch: int, seq_len: int, accum_steps: int) -> None:
    """Clear errors for a batch the mesh or accumulation cannot split."""
    if accum_steps < 1 or batch % accum_steps:
        raise UserError(f"--accum {accum_steps} must divide the batch of {batch} rows")
    batch_sharding(mesh, shape=(accum_steps, batch // accum_steps, seq_len))


def _loss_sums(
    params: Any,
    batch: Any,
    frozen: Any,
    dropout_key: jax.Array | None,
    *,
    config: ModelConfig,
    step_config: StepConfig,
    subset: Subset,
    objective: Objective,
    training: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective's summed (not averaged) loss and metric sums over one (micro)batch, so
    microbatches add up exactly."""
    weights, extra = split_trainable(params, objective)
    base, adapters = subset.apply(weights, frozen, config=config, compute_dtype=step_config.compute_dtype)
    compute = step_config.compute_dtype
    extra = cast_floats(extra, compute)
    rate = step_config.dropout if training else 0.0
    model = ModelView(
        config=config,
        params=base,
        adapters=adapters,
        compute_dtype=compute,
        dropout=(rate, dropout_key) if rate > 0 and dropout_key is not None else None,
        recompute=step_config.recompute,
    )
    loss_sum, sums = objective.loss(model, extra, batch)
    return loss_sum, sums


def train_step_fn(
    state: TrainState,
    batch: Any,
    frozen: Any = None,
    *,
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    step_config: StepConfig,
    mesh: Mesh | None,
    subset: Subset = FULL,
    objective: Objective | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (unjitted; ``make_train_step`` compiles it). ``frozen``: the base
    weights a LoRA subset adapts (None when every weight trains)."""
    objective = _resolve_objective(config, objective)
    loss_fn = functools.partial(_loss_sums, config=config, step_config=step_config, subset=subset, objective=objective)
    rng, dropout_rng = jax.random.split(state.rng)
    with activation_sharding(mesh) if mesh is not None else contextlib.nullcontext():
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if step_config.accum_steps == 1:
            (loss_sum, sums), grads = grad_fn(state.params, batch, frozen, dropout_rng)
        else:

            def microbatch(carry: Any, xs: Any) -> tuple[Any, None]:
                grads_acc, loss_acc, sums_acc = carry
                index, mb = xs

                def run() -> Any:
                    (loss, mb_sums), grads = grad_fn(state.params, mb, frozen, jax.random.fold_in(dropout_rng, index))
                    return grads, loss, mb_sums

                # A microbatch without work (a packed batch's spare rows) costs no forward pass.
                grads, loss, mb_sums = jax.lax.cond(
                    objective.has_work(mb), run, lambda: (zeros, jnp.zeros((), jnp.float32), zero_sums)
                )
                return (
                    jax.tree.map(jnp.add, grads_acc, grads),
                    loss_acc + loss,
                    jax.tree.map(jnp.add, sums_acc, mb_sums),
                ), None

            first = jax.tree.map(lambda x: x[0], batch)
            sums_shape = jax.eval_shape(loss_fn, state.params, first, frozen, dropout_rng)[1]
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
            indices = jnp.arange(step_config.accum_steps)
            (grads, loss_sum, sums), _ = jax.lax.scan(
                microbatch, (zeros, jnp.zeros((), jnp.float32), zero_sums), (indices, batch)
            )
        count = sums["count"]
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss = loss_sum / denominator
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    # A non-finite step leaves the state as it was; the loop sees `finite` and stops.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {name: value / denominator for name, value in sums.items() if name != "count"}
    metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.step), count=count, finite=finite)
    return new_state, metrics


def make_train_step(
    *,
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    step_config: StepConfig,
    mesh: Mesh,
    shardings: TrainState,
    batch_shape: tuple[int, ...] | None = None,
    batch_example: Any = None,
    subset: Subset = FULL,
    objective: Objective | None = None,
    frozen: Any = None,
) -> Any:
    """``train_step(state, batch)`` compiled for ``mesh`` with the state donated. The batch is a
    ``Batch`` of ``batch_shape`` fields, or any pytree laid out like ``batch_example``;
    ``frozen`` (a LoRA subset's base) is placed on the mesh once and passed to every step."""
    objective = _resolve_objective(config, objective)
    if batch_example is None:
        batch_example = Batch(*[jax.ShapeDtypeStruct(batch_shape, jnp.int32)] * len(BATCH_FIELDS))
    accum = step_config.accum_steps
    data = batch_shardings(mesh, batch_example, objective=objective, accum_steps=accum)
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = functools.partial(
        train_step_fn,
        config=config,
        optimizer=optimizer,
        schedule=schedule,
        step_config=step_config,
        mesh=mesh,
        subset=subset,
        objective=objective,
    )
    base_layout = subset.frozen_shardings(config, frozen, mesh)
    placed = None if frozen is None else jax.device_put(frozen, base_layout)
    compiled = jax.jit(
        fn,
        in_shardings=(shardings, data, base_layout),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    return lambda state, batch: compiled(state, batch, placed)


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


def global_batch(
    local: dict[str, np.ndarray],
    mesh: Mesh,
    *,
    global_rows: int,
    accum_steps: int,
    objective: Objective | None = None,
    batch_type: Any = Batch,
) -> Any:
    """A global batch (``batch_type``, a dataclass of the fields in ``local``) from this
    process's rows (``local_batch_positions``; all rows when there is one process)."""
    axes_of = default_batch_axes if objective is None else objective.batch_axes
    fields = {}
    for name, array in local.items():
        array = np.asarray(array)
        rest = array.shape[1:]
        shape = (global_rows, *rest) if accum_steps == 1 else (accum_steps, global_rows // accum_steps, *rest)
        if accum_steps > 1:
            array = array.reshape(accum_steps, -1, *rest)
        sharding = batch_sharding(mesh, shape=shape, axes=axes_of(name, 1 + len(rest)))
        fields[name] = jax.make_array_from_process_local_data(sharding, array, shape)
    return batch_type(**fields)


def make_eval_step(
    *,
    config: ModelConfig,
    step_config: StepConfig,
    mesh: Mesh,
    shardings: TrainState,
    batch_shape: tuple[int, ...] | None = None,
    batch_example: Any = None,
    subset: Subset = FULL,
    objective: Objective | None = None,
    frozen: Any = None,
    metric: str = "cross_entropy",
) -> Any:
    """``eval_step(params, batch) -> (metric sum, count)`` summed for exact averages over many
    batches, without dropout; compiled for ``mesh``. ``metric="loss"`` gives the objective's loss."""
    objective = _resolve_objective(config, objective)
    if batch_example is None:
        batch_example = Batch(*[jax.ShapeDtypeStruct(batch_shape, jnp.int32)] * len(BATCH_FIELDS))

    def eval_fn(params: Any, batch: Any, frozen: Any) -> tuple[jax.Array, jax.Array]:
        with activation_sharding(mesh):
            loss_sum, sums = _loss_sums(
                params,
                batch,
                frozen,
                None,
                config=config,
                step_config=step_config,
                subset=subset,
                objective=objective,
                training=False,
            )
        return (loss_sum if metric == "loss" else sums[metric]), sums["count"]

    data = batch_shardings(mesh, batch_example, objective=objective, accum_steps=1)
    replicated = NamedSharding(mesh, PartitionSpec())
    base_layout = subset.frozen_shardings(config, frozen, mesh)
    placed = None if frozen is None else jax.device_put(frozen, base_layout)
    compiled = jax.jit(
        eval_fn, in_shardings=(shardings.params, data, base_layout), out_shardings=(replicated, replicated)
    )
    return lambda params, batch: compiled(params, batch, placed)


def make_token_log_probs(
    *,
    config: ModelConfig,
    step_config: StepConfig,
    mesh: Mesh,
    shardings: TrainState,
    batch_example: Any,
    subset: Subset = FULL,
    objective: Objective | None = None,
    frozen: Any = None,
) -> Any:
    """``token_log_probs(params, batch) -> [rows, T]``: ``log p(batch.targets)`` per position
    under ``params`` (laid out as ``state.params``) over ``frozen``, by the forward the train step
    differentiates, so a policy's log-probs taken here equal those its first update step sees.
    ``batch``: a ``PolicyBatch`` (its ``tokens``, ``positions``, ``segment_ids``, ``branch_ids``
    and ``targets``)."""
    objective = _resolve_objective(config, objective)
    compute = step_config.compute_dtype

    def log_probs_fn(params: Any, batch: Any, frozen: Any) -> jax.Array:
        weights, _ = split_trainable(params, objective)
        base, adapters = subset.apply(weights, frozen, config=config, compute_dtype=compute)
        model = ModelView(config=config, params=base, adapters=adapters, compute_dtype=compute)
        with activation_sharding(mesh):
            return model.target_log_probs(
                batch.tokens, batch.positions, batch.segment_ids, batch.targets, batch.branch_ids
            )

    data = batch_shardings(mesh, batch_example, objective=objective, accum_steps=1)
    base_layout = subset.frozen_shardings(config, frozen, mesh)
    placed = None if frozen is None else jax.device_put(frozen, base_layout)
    compiled = jax.jit(log_probs_fn, in_shardings=(shardings.params, data, base_layout))
    return lambda params, batch: compiled(params, batch, placed)
