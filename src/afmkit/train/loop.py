"""A short training loop with hooks around the pure ``train_step``.

The loop only steps, times and checks; everything else (logging, evaluation, checkpoints,
profiling) is a hook with ``on_step`` and ``on_end``. A non-finite loss or gradient stops the run
with ``NonFiniteError`` before any hook sees that step, so no checkpoint of it is ever written.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from afmkit.errors import UserError
from afmkit.train.step import Batch, TrainState


class NonFiniteError(UserError):
    """The loss or the gradient norm became NaN or infinite."""

    def __init__(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self.metrics = metrics
        super().__init__(
            f"step {step}: the loss is {metrics['loss']} and the gradient norm {metrics['grad_norm']}, not finite; "
            "training stopped without applying or saving that step"
        )


@dataclasses.dataclass
class StepInfo:
    step: int  # optimizer steps completed, counting this one
    state: TrainState
    metrics: dict[str, float]  # loss, the objective's own (next-token: cross_entropy), grad_norm, lr, count, seconds
    batch: Any  # a train.step.Batch, or the objective's own batch type


class Hook:
    def on_step(self, info: StepInfo) -> None:
        pass

    def on_end(self, state: TrainState, step: int) -> None:
        pass

    def close(self) -> None:
        """Release resources; called once whether the run ended well or not."""


def train_loop(
    *,
    state: TrainState,
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]],
    next_batch: Callable[[], Batch],
    start_step: int,
    end_step: int,
    hooks: Sequence[Hook] = (),
    stop_requested: Callable[[], bool] = lambda: False,
) -> TrainState:
    """Steps ``start_step+1 .. end_step``; returns the final state (its ``step`` says how far it
    got). ``stop_requested`` is asked after each step's hooks: when it says yes (Ctrl-C), the loop
    ends there and the hooks' ``on_end`` runs for that step (so the checkpoint hook saves it)."""
    last = time.perf_counter()
    step = start_step
    for step in range(start_step + 1, end_step + 1):
        batch = next_batch()
        state, device_metrics = train_step(state, batch)
        metrics = {k: v.item() for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        metrics["seconds"], last = now - last, now
        if not metrics.pop("finite") or not math.isfinite(metrics["loss"]):
            raise NonFiniteError(step, metrics)
        info = StepInfo(step=step, state=state, metrics=metrics, batch=batch)
        for hook in hooks:
            hook.on_step(info)
        if stop_requested():
            break
    for hook in hooks:
        hook.on_end(state, step)
    return state
