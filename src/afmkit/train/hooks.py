"""The loop's hooks: metrics (JSONL), progress bar, evaluation, checkpoints, profiling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.train.checkpoint import Checkpoints
from afmkit.train.loop import Hook, StepInfo
from afmkit.train.metrics import MetricsLog, mfu
from afmkit.train.step import TrainState


def batch_tokens(batch: Any) -> int:
    """Tokens a step processed, including masked ones: every field named ``tokens`` or
    ``*_tokens`` (a pair batch has two)."""
    fields = vars(batch) if hasattr(batch, "__dict__") else dict(batch)
    return sum(int(np.prod(v.shape)) for k, v in fields.items() if k == "tokens" or k.endswith("_tokens"))


class MetricsHook(Hook):
    """Per step: loss, cross-entropy, grad norm, LR, tokens/s, MFU (when the peak is known)."""

    def __init__(
        self,
        *,
        log: MetricsLog,
        config: ModelConfig,
        seq_len: int,
        peak_per_device: float | None,
        epoch: Callable[[], float],
    ) -> None:
        self.log, self.config, self.seq_len, self.peak, self.epoch = log, config, seq_len, peak_per_device, epoch

    def on_step(self, info: StepInfo) -> None:
        m = info.metrics
        tokens = batch_tokens(info.batch)
        tokens_per_s = tokens / max(m["seconds"], 1e-9)
        record: dict[str, Any] = {
            "step": info.step,
            "loss": m["loss"],
            # the objective's own metrics (next-token: cross_entropy; reward model: pair_accuracy...)
            **{k: v for k, v in m.items() if k not in ("loss", "grad_norm", "lr", "count", "seconds")},
            "grad_norm": m["grad_norm"],
            "lr": m["lr"],
            "tokens": tokens,
            "seconds": round(m["seconds"], 4),
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": mfu(
                tokens_per_second=tokens_per_s, config=self.config, seq_len=self.seq_len, peak_per_device=self.peak
            ),
            "epoch": round(self.epoch(), 4),
        }
        self.log.write(record)
        self.last = record


class ProgressHook(Hook):
    """Steps, loss, tokens/s and ETA on stderr (``afmkit.progress.ProgressReporter``): a bar on a
    terminal, else a plain log line every ``log_every`` steps (default: every 5% of the run)."""

    def __init__(self, *, total: int, start: int, log_every: int | None = None) -> None:
        from afmkit.progress import ProgressReporter

        self.reporter = ProgressReporter("training", total, unit="steps", completed=start, log_every=log_every)
        self.reporter.__enter__()
        self.open = True

    def on_step(self, info: StepInfo) -> None:
        tokens = batch_tokens(info.batch)
        self.reporter.advance(1, tokens=tokens, loss=f"{info.metrics['loss']:.4f}")

    def close(self) -> None:
        if self.open:
            self.open = False
            self.reporter.__exit__(None, None, None)


class EvalHook(Hook):
    """Mean loss on fixed held-out batches every ``every`` steps (and at the end): the eval
    step's sums over all batches divided by their summed count (an exact token mean)."""

    def __init__(self, *, every: int, eval_step: Any, batches: Sequence[Any], log: MetricsLog | None) -> None:
        self.every, self.eval_step, self.batches, self.log = every, eval_step, list(batches), log
        self.done: set[int] = set()

    def evaluate(self, state: TrainState, step: int) -> float:
        sums = [self.eval_step(state.params, b) for b in self.batches]
        loss = sum(float(total) for total, _ in sums) / max(sum(float(count) for _, count in sums), 1.0)
        self.done.add(step)
        if self.log is not None:
            self.log.write({"step": step, "eval_loss": loss})
        return loss

    def on_step(self, info: StepInfo) -> None:
        if info.step % self.every == 0:
            self.evaluate(info.state, info.step)

    def on_end(self, state: TrainState, step: int) -> None:
        if step not in self.done:
            self.evaluate(state, step)


class CheckpointHook(Hook):
    """Asynchronous saves every ``every`` steps and at the end, with the loader's position."""

    def __init__(self, *, checkpoints: Checkpoints, every: int, loader: Any) -> None:
        self.checkpoints, self.every, self.loader = checkpoints, every, loader
        self.saved: set[int] = set()

    def on_step(self, info: StepInfo) -> None:
        if info.step % self.every == 0:
            self.checkpoints.save(info.step, info.state.as_dict(), self.loader.state())
            self.saved.add(info.step)

    def on_end(self, state: TrainState, step: int) -> None:
        if step not in self.saved and self.checkpoints.latest_step() != step:
            self.checkpoints.save(step, state.as_dict(), self.loader.state())
        self.checkpoints.wait()

    def close(self) -> None:
        self.checkpoints.wait()  # a pending save completes: the last good checkpoint is whole


class ProfileHook(Hook):
    """A ``jax.profiler`` trace of steps ``a+1..b`` (``--profile-steps a:b``), for TensorBoard/Perfetto."""

    def __init__(self, *, directory: str, steps: str) -> None:
        try:
            first, last = (int(x) for x in steps.split(":"))
        except ValueError:
            raise UserError(f"--profile-steps must be FIRST:LAST (e.g. 3:6), got {steps!r}") from None
        if not 0 <= first < last:
            raise UserError(f"--profile-steps {steps}: need 0 <= FIRST < LAST")
        self.directory, self.first, self.last, self.active = directory, first, last, False
        if first == 0:
            self._start()

    def _start(self) -> None:
        jax.profiler.start_trace(self.directory)
        self.active = True

    def on_step(self, info: StepInfo) -> None:
        if info.step == self.first and not self.active:
            self._start()
        elif info.step == self.last and self.active:
            jax.block_until_ready(info.state.params)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
