"""Sampling parameters and the jitted token sampler (greedy, temperature, top-k, top-p).

Every row of a batch carries its own parameters and its own random key, so a row's tokens do
not depend on what else shares its batch.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp

from afmkit.errors import UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` are off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise UserError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if not isinstance(self.seed, int) or not (0 <= self.seed < 2**32):
            raise UserError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


class SamplerMode(enum.Enum):
    """Compiled variant of the sampler: the cheapest one that serves every row of a batch."""

    GREEDY = "greedy"
    SAMPLE = "sample"  # temperature only
    FILTERED = "filtered"  # top-k and/or top-p: needs a sort of the vocabulary

    @classmethod
    def for_batch(cls, params: list[SamplingParams]) -> SamplerMode:
        if all(p.greedy for p in params):
            return cls.GREEDY
        return cls.FILTERED if any(p.filtered for p in params) else cls.SAMPLE


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """Per-row sampling parameters and random keys, kept on the device."""

    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32
    keys: jax.Array  # [B, 2] uint32

    @classmethod
    def from_params(cls, params: list[SamplingParams]) -> SamplerState:
        return cls(
            temperature=jnp.asarray([p.temperature for p in params], jnp.float32),
            top_k=jnp.asarray([p.top_k for p in params], jnp.int32),
            top_p=jnp.asarray([p.top_p for p in params], jnp.float32),
            keys=jnp.stack([jax.random.PRNGKey(p.seed) for p in params]),
        )


def sample(logits: jax.Array, state: SamplerState, step: jax.Array, *, mode: SamplerMode) -> jax.Array:
    """One token per row from ``logits [B, V]``; ``step`` (scalar or ``[B]``) makes each step's
    randomness fresh."""
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode is SamplerMode.GREEDY:
        return greedy_tokens
    temperature = jnp.maximum(state.temperature, 1e-6)[:, None]
    scaled = logits / temperature
    if mode is SamplerMode.FILTERED:
        scaled = _filter_top_k_top_p(scaled, state.top_k, state.top_p)
    # ``step`` is one scalar for the batch or one per row (rows that joined a running batch later).
    keys = jax.vmap(jax.random.fold_in)(state.keys, jnp.broadcast_to(step, state.keys.shape[:1]))
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(state.temperature > 0, sampled, greedy_tokens)


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf every logit outside the row's top-k and outside its top-p nucleus."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_value = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    ordered = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p[:, None]
    last_kept = jnp.maximum(keep.sum(axis=-1) - 1, 0)
    nucleus_value = jnp.take_along_axis(ordered, last_kept[:, None], axis=-1)
    threshold = jnp.maximum(kth_value, nucleus_value)
    return jnp.where(logits >= threshold, logits, -jnp.inf)
