"""Optimizers and the learning-rate schedule, built from Optax transforms.

Both optimizers clip the raw gradient to a global norm of 1 first, and both decay weights in the
*decoupled* way (Loshchilov & Hutter, and AXLearn's ``update_schedule``): the step subtracts
``weight_decay * (lr_t / peak_lr) * w``, i.e. the decay follows the schedule's shape but not the
learning rate's magnitude, so AFM's published pair (peak LR 0.01, weight decay 3.16e-4) means
what it says: at the peak, weights shrink by 3.16e-4 per step. (Optax's and PyTorch's ``AdamW``
multiply the decay by the LR instead: their ``weight_decay=0.1`` at LR 3e-3 is ``3e-4`` here.)
Norm scales (1-d weights) are not decayed.

``afm`` is AFM's RMSProp-with-momentum variant (AFM_SPEC section 3):

1. ``u = g / (sqrt(v_hat) + eps)`` where ``v`` is an EMA of ``g**2`` with decay 0.95 and
   ``v_hat = v / (1 - 0.95**t)`` is its bias-corrected value;
2. each parameter block (each weight array) has its update clipped to an RMS of at most 1.0:
   ``u * min(1, 1 / rms(u))`` (the RMS, not the L2 norm, so the bound does not shrink with the
   block's size; this is how AXLearn clips per block);
3. momentum: ``m = 0.95 * m + 0.05 * u``, *not* bias-corrected;
4. the step is ``-lr_t * m - weight_decay * (lr_t / peak_lr) * w``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from afmkit.errors import UserError
from afmkit.train.settings import PretrainConfig, default_warmup

OPTIMIZERS = ("adamw", "afm")


_RUN = PretrainConfig(out="")  # the run settings' defaults have one source: PretrainConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    name: str = _RUN.optimizer
    peak_lr: float = _RUN.lr
    warmup_steps: int = default_warmup(_RUN.steps)
    total_steps: int = _RUN.steps
    final_lr_fraction: float = _RUN.final_lr_fraction  # cosine decays to this fraction of the peak (AFM: 0.005)
    # Extensions of a run past its planned steps, as (from_step, to_step) pairs: from each
    # from_step the LR follows a new cosine from its value there down to the floor at to_step.
    replans: tuple[tuple[int, int], ...] = ()
    weight_decay: float = _RUN.weight_decay  # per step at the peak LR (AFM's value); see the module docstring
    clip_global_norm: float = 1.0
    # AdamW
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # AFM RMSProp-momentum
    rms_decay: float = 0.95
    momentum_decay: float = 0.95
    block_rms_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.peak_lr <= 0:
            raise UserError(f"the learning rate must be positive, got {self.peak_lr}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise UserError("warm-up steps must be >= 0 and total steps >= 1")
        if not 0 <= self.final_lr_fraction <= 1:
            raise UserError(f"the final LR fraction must lie in [0, 1], got {self.final_lr_fraction}")
        end = self.total_steps
        for start, stop in self.replans:
            if not 0 <= start <= end < stop:
                raise UserError(
                    f"a schedule extension from step {start} to {stop} must start within the previous plan "
                    f"(steps 0..{end}) and end after it"
                )
            end = stop


def lr_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over ``warmup_steps``, then cosine decay to
    ``final_lr_fraction * peak`` at ``total_steps`` (and flat after).

    Each extension ``(start, stop)`` in ``config.replans`` re-plans the rest: from ``start`` the
    LR follows a cosine from the value the plan so far gives at ``start`` down to the floor at
    ``stop``, so the LR is continuous where a run was extended."""
    peak, warmup = config.peak_lr, config.warmup_steps
    floor = config.final_lr_fraction * peak
    decay_steps = max(config.total_steps - warmup, 1)

    def planned(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum((step + 1) / max(warmup, 1), 1.0)  # step 0 already moves
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    schedule = planned
    for start, stop in config.replans:
        schedule = _replanned(schedule, start=start, stop=stop, floor=floor)
    return schedule


def _replanned(before: optax.Schedule, *, start: int, stop: int, floor: float) -> optax.Schedule:
    """``before`` up to ``start``, then a cosine from ``before(start)`` to ``floor`` at ``stop``."""
    begin = float(before(start))  # a number fixed when the plan is made, not traced

    def schedule(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        progress = jnp.clip((step - start) / (stop - start), 0.0, 1.0)
        cosine = floor + (begin - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < start, before(count), cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """Decay matrices, not norm scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


class _Empty(NamedTuple):
    pass


def clip_by_block_rms(max_rms: float) -> optax.GradientTransformation:
    """Scale each array's update down so that its RMS is at most ``max_rms``."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params

        def clip(u: jax.Array) -> jax.Array:
            rms = jnp.sqrt(jnp.mean(jnp.square(u)))
            return u * jnp.minimum(1.0, max_rms / jnp.maximum(rms, 1e-30))

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: _Empty(), update)


def build_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The optimizer named in ``config`` as one Optax chain."""
    if config.name == "adamw":
        direction = [optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)]
    else:
        direction = [
            optax.scale_by_rms(decay=config.rms_decay, eps=config.eps, eps_in_sqrt=False, bias_correction=True),
            clip_by_block_rms(config.block_rms_clip),
            optax.ema(decay=config.momentum_decay, debias=False),
        ]
    return optax.chain(
        optax.clip_by_global_norm(config.clip_global_norm),
        *direction,
        optax.add_decayed_weights(config.weight_decay / config.peak_lr, mask=decay_mask),
        optax.scale_by_learning_rate(lr_schedule(config)),
    )
