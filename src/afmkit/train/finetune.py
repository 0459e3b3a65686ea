"""Fine-tuning a loaded model on packed rows: the driver that post-training recipes share
(``afmkit adapter train``, ``afmkit posttrain sft``), on the one ``train_step`` and loop.

Given a model, a trainable subset (``train.trainable``: all weights, or a LoRA adapter over the
frozen, possibly packed, base), an objective (``train.objectives``) and rows, it builds the
sharded step, restores the latest checkpoint when resuming, and runs the loop with the shared
hooks: metrics JSONL (+ a PNG of the loss), the progress bar, Orbax checkpoints of the trained
weights, optimizer state and loader position (exact resume), and the recipe's own ``on_save``
(writing an adapter or a model directory). A non-finite step stops the run with a one-line
error; Ctrl-C stops after the step in flight and saves it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from afmkit.errors import UserError
from afmkit.model.packed import is_packed
from afmkit.train.loop import Hook, StepInfo
from afmkit.train.objectives import Objective
from afmkit.train.optim import OptimizerConfig
from afmkit.train.step import Batch, StepConfig
from afmkit.train.trainable import FullWeights, LoraWeights


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneRun:
    """What one fine-tuning run does (the recipe fills it from its settings)."""

    subset: FullWeights | LoraWeights
    objective: Objective
    optimizer: OptimizerConfig
    step_config: StepConfig
    batch: int  # rows per optimizer step
    steps: int
    seed: int = 0
    mesh: str | None = None  # None: one device
    run_dir: Path | None = None  # checkpoints/, metrics.jsonl, loss.png; None: keep nothing
    save_every: int = 0  # 0: only at the end
    keep: int = 3
    resume: bool = False
    progress: bool = True
    # The rows' batch type: ``train.step.Batch`` (packed token rows) by default; an objective
    # of another batch (``objectives.PairBatch``) names its own, and the held-out metric.
    batch_type: Any = None
    initial: Any = None  # a LoRA subset's trained tree to start from (a recovery adapter's); None: fresh
    eval_metric: str = "cross_entropy"


class _SaveHook(Hook):
    """The recipe's own save (adapter / model directory) every ``every`` steps and at the end."""

    def __init__(self, every: int, save: Callable[[Any, int], None]) -> None:
        self.every, self.save, self.done = every, save, -1

    def on_step(self, info: StepInfo) -> None:
        if self.every and info.step % self.every == 0:
            self.save(info.state.params, info.step)
            self.done = info.step

    def on_end(self, state: Any, step: int) -> None:
        if step != self.done:
            self.save(state.params, step)


class _LossHook(Hook):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, info: StepInfo) -> None:
        self.losses.append(info.metrics["loss"])


def _mesh(spec: str | None) -> Any:
    from afmkit.sharding.mesh import make_mesh

    return make_mesh(spec) if spec else make_mesh("data=1", devices=jax.devices()[:1])


def _row_count(rows: dict[str, np.ndarray]) -> int:
    return len(next(iter(rows.values())))


def _batch_example(rows: dict[str, np.ndarray], batch_type: Any, lead: tuple[int, ...]) -> Any:
    """The global batch's layout (``ShapeDtypeStruct`` fields) for rows of any batch type."""
    return batch_type(**{name: jax.ShapeDtypeStruct((*lead, *a.shape[1:]), a.dtype) for name, a in rows.items()})


def finetune(
    model: Any,
    rows: dict[str, np.ndarray],
    run: FinetuneRun,
    *,
    eval_rows: dict[str, np.ndarray] | None = None,
    on_save: Callable[[Any, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (a ``LanguageModel``; never modified) on packed ``rows`` (``Batch``
    fields ``[R, T]``). Returns the trained tree (``params``), per-step ``losses``, the held-out
    loss before and after (``eval_before``/``eval_after``, when ``eval_rows``), ``start_step``
    and ``seconds``. ``on_save(params, step)`` writes the recipe's output."""
    from afmkit.data.chat import ChatLoader
    from afmkit.train import hooks as hooks_lib
    from afmkit.train.checkpoint import Checkpoints
    from afmkit.train.loop import NonFiniteError, train_loop
    from afmkit.train.metrics import MetricsLog, plot_loss
    from afmkit.train.optim import build_optimizer, lr_schedule
    from afmkit.train.pretrain import _StopOnCtrlC
    from afmkit.train.step import (
        TrainState,
        abstract_state,
        check_batch_layout,
        global_batch,
        init_sharded_state,
        local_batch_positions,
        make_eval_step,
        make_train_step,
        state_shardings,
    )

    config, subset, objective = model.config, run.subset, run.objective
    if run.steps < 1 or run.batch < 1:
        raise UserError("--steps and --batch must be positive")
    full = isinstance(subset, FullWeights)
    if full and is_packed(model.params):
        raise UserError(
            "full fine-tuning updates every weight, which packed (int4/int8) weights cannot hold; "
            "load the model with --dtype float32 (or train a LoRA adapter on the packed base)"
        )
    batch_type = run.batch_type or Batch
    seq_len = next(array.shape[1] for name, array in rows.items() if name.endswith("tokens"))
    mesh = _mesh(run.mesh)
    accum = run.step_config.accum_steps
    check_batch_layout(mesh, batch=run.batch, seq_len=seq_len, accum_steps=accum)
    frozen = None if full else model.params
    optimizer = build_optimizer(run.optimizer)
    schedule = lr_schedule(run.optimizer)
    shardings = state_shardings(config, optimizer, mesh, subset=subset, objective=objective)
    loader = ChatLoader.of(rows, global_batch=run.batch, seed=run.seed)
    positions = local_batch_positions(mesh, global_rows=run.batch, seq_len=seq_len, accum_steps=accum)

    checkpoints = Checkpoints(run.run_dir / "checkpoints", keep=run.keep) if run.run_dir is not None else None
    latest = checkpoints.latest_step() if checkpoints is not None and run.resume else None
    if latest is not None:
        abstract = abstract_state(config, optimizer, subset=subset, objective=objective)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        restored, loader_state = checkpoints.restore(latest, target.as_dict())
        state = TrainState.from_dict(restored)
        loader.restore(loader_state)
    else:
        initial = model.params if full else run.initial
        state = init_sharded_state(
            config, optimizer, shardings, seed=run.seed, subset=subset, objective=objective, initial=initial
        )
    start_step = int(state.step)
    train_step = make_train_step(
        config=config,
        optimizer=optimizer,
        schedule=schedule,
        step_config=run.step_config,
        mesh=mesh,
        shardings=shardings,
        batch_example=_batch_example(rows, batch_type, (run.batch,) if accum == 1 else (accum, run.batch // accum)),
        subset=subset,
        objective=objective,
        frozen=frozen,
    )

    def next_batch() -> Any:
        return global_batch(
            loader.next_batch(positions),
            mesh,
            global_rows=run.batch,
            accum_steps=accum,
            objective=objective,
            batch_type=batch_type,
        )

    evaluate = None
    if eval_rows is not None and _row_count(eval_rows):
        eval_step = make_eval_step(
            config=config,
            step_config=run.step_config,
            mesh=mesh,
            shardings=shardings,
            batch_example=_batch_example(eval_rows, batch_type, (run.batch,)),
            subset=subset,
            objective=objective,
            frozen=frozen,
            metric=run.eval_metric,
        )
        eval_batches = []
        for lo in range(0, _row_count(eval_rows), run.batch):
            chunk = {k: v[lo : lo + run.batch] for k, v in eval_rows.items()}
            pad = run.batch - _row_count(chunk)  # all-zero rows: segment 0 / pair_mask 0, no loss
            chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
            eval_batches.append(
                global_batch(
                    chunk, mesh, global_rows=run.batch, accum_steps=1, objective=objective, batch_type=batch_type
                )
            )

        def evaluate(params: Any) -> float | None:
            sums = [eval_step(params, b) for b in eval_batches]
            count = sum(float(c) for _, c in sums)
            # None, not 0, when the held-out rows learn nothing (e.g. only unlikely text)
            return sum(float(t) for t, _ in sums) / count if count else None

    results: dict[str, Any] = {"start_step": start_step}
    if evaluate is not None:
        results["eval_before"] = evaluate(state.params)

    losses = _LossHook()
    hooks: list[Hook] = [losses]
    log = None
    if run.run_dir is not None:
        log = MetricsLog(run.run_dir / "metrics.jsonl", resume_from_step=start_step if run.resume else None)
        hooks.append(
            hooks_lib.MetricsHook(log=log, config=config, seq_len=seq_len, peak_per_device=None, epoch=loader.epoch)
        )
    if on_save is not None:
        hooks.append(_SaveHook(run.save_every, on_save))
    if checkpoints is not None:
        hooks.append(
            hooks_lib.CheckpointHook(checkpoints=checkpoints, every=run.save_every or run.steps, loader=loader)
        )
    if run.progress:
        hooks.append(hooks_lib.ProgressHook(total=run.steps, start=start_step))
    start = time.perf_counter()
    interrupt = _StopOnCtrlC(enabled=jax.process_count() == 1)
    try:
        with interrupt:
            state = train_loop(
                state=state,
                train_step=train_step,
                next_batch=next_batch,
                start_step=start_step,
                end_step=run.steps,
                hooks=hooks,
                stop_requested=interrupt.requested,
            )
    except NonFiniteError as exc:
        kept = checkpoints.latest_step() if checkpoints is not None else None
        where = f"; the last good checkpoint is step {kept}" if kept else ""
        raise UserError(f"{exc}{where}. Lower --lr or raise --warmup") from None
    finally:
        for hook in hooks:
            hook.close()
        if checkpoints is not None:
            checkpoints.close()
    results["seconds"] = time.perf_counter() - start
    results["losses"] = losses.losses
    results["steps_done"] = int(state.step)
    if evaluate is not None:
        results["eval_after"] = evaluate(state.params)
    if log is not None and log.records:
        plot_loss(
            log.records, run.run_dir / "loss.png", title=f"{objective.name} of {model.name}", unit=objective.loss_unit
        )
    results["params"] = jax.device_get(state.params)
    return results
