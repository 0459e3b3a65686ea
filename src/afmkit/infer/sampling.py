"""Sampling parameters and the jitted token sampler (greedy, temperature, top-k, top-p).

Every row of a batch carries its own parameters and its own random key, so a row's tokens do
not depend on what else shares its batch.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.errors import UserError

# Above this temperature every token is all but equally likely (logits of this model span a few
# tens, so at 100 their differences shrink below 0.5 before the softmax): larger values buy nothing.
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 2**31 - 1  # top_k is an int32 on the device
MAX_NEW_TOKENS = 2**31 - 1
SEED_RANGE = 2**32  # seeds are uint32 random keys
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]


class SamplingError(UserError):
    """A sampling parameter out of its range; ``field`` names it (the server reports it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {len(text.lstrip('-'))}-digit number"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` are off.

    Every field's range is checked here, the one place the engine, the CLI and the server share;
    a new field gets its check here and its per-row device array in ``SamplerState``."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    # OpenAI's penalties on tokens already generated (not the prompt), before any sampling:
    # logit -= presence_penalty * (count > 0) + frequency_penalty * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

        def require(field: str, ok: bool, what: str) -> None:
            if not ok:
                raise SamplingError(field, f"{field} must be {what}, got {_shown(getattr(self, field))}")

        def integer_in(field: str, low: int, high: int, what: str) -> None:
            value = getattr(self, field)
            require(field, isinstance(value, int) and not isinstance(value, bool) and low <= value <= high, what)

        integer_in("max_new_tokens", 1, MAX_NEW_TOKENS, "a positive integer")
        t = self.temperature
        require(
            "temperature",
            _is_number(t) and 0 <= t <= MAX_TEMPERATURE,  # NaN fails both comparisons
            f"a number in [0, {MAX_TEMPERATURE:g}] (0 means greedy)",
        )
        integer_in("top_k", 0, MAX_TOP_K, f"an integer in [0, {MAX_TOP_K}] (0 turns it off)")
        require("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 turns it off)")
        integer_in("seed", 0, SEED_RANGE - 1, "an integer in [0, 2**32)")
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            require(field, _is_number(value) and -MAX_PENALTY <= value <= MAX_PENALTY, "a number in [-2, 2]")
            object.__setattr__(self, field, float(value))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", "stop strings must be non-empty strings")
        # Compared exactly above (a huge integer included); stored as the floats the device uses.
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


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


def seed_keys(seeds: Any) -> np.ndarray:
    """``jax.random.PRNGKey(seed)`` of each seed in ``[0, 2**32)``, ``[N, 2]`` uint32, computed here
    instead of by one device call per seed (50 ms each on a CPU, most of a batch's admission): a
    threefry key of a 32-bit seed is ``[0, seed]`` (tests/infer/test_sampling.py checks it)."""
    seeds = np.asarray(seeds, np.uint32)
    return np.stack([np.zeros_like(seeds), seeds], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """Per-row sampling parameters and random keys, kept on the device."""

    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32
    keys: jax.Array  # [B, 2] uint32
    presence_penalty: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32

    @classmethod
    def from_params(cls, params: list[SamplingParams]) -> SamplerState:
        return cls(
            temperature=jnp.asarray([p.temperature for p in params], jnp.float32),
            top_k=jnp.asarray([p.top_k for p in params], jnp.int32),
            top_p=jnp.asarray([p.top_p for p in params], jnp.float32),
            keys=jnp.asarray(seed_keys([p.seed for p in params])),
            presence_penalty=jnp.asarray([p.presence_penalty for p in params], jnp.float32),
            frequency_penalty=jnp.asarray([p.frequency_penalty for p in params], jnp.float32),
        )


def penalize(logits: jax.Array, state: SamplerState, counts: jax.Array) -> jax.Array:
    """OpenAI's presence and frequency penalties: ``counts [B, V]`` is how often each row has
    generated each token so far."""
    counts = counts.astype(logits.dtype)
    presence = state.presence_penalty[:, None].astype(logits.dtype)
    frequency = state.frequency_penalty[:, None].astype(logits.dtype)
    return logits - presence * (counts > 0) - frequency * counts


def count_tokens(counts: jax.Array, tokens: jax.Array) -> jax.Array:
    """``counts [B, V]`` after each row generated ``tokens [B]``."""
    return counts.at[jnp.arange(tokens.shape[0]), tokens].add(1)


def sample(
    logits: jax.Array, state: SamplerState, step: jax.Array, *, mode: SamplerMode, counts: jax.Array | None = None
) -> jax.Array:
    """One token per row from ``logits [B, V]``; ``step`` (scalar or ``[B]``) makes each step's
    randomness fresh; ``counts`` (the rows' generated-token counts) applies the penalties."""
    if counts is not None:
        logits = penalize(logits, state, counts)
    greedy_tokens = first_argmax(logits)
    if mode is SamplerMode.GREEDY:
        return greedy_tokens
    temperature = jnp.maximum(state.temperature, 1e-6)[:, None]
    scaled = logits / temperature
    if mode is SamplerMode.FILTERED:
        scaled = _filter_top_k_top_p(scaled, state.top_k, state.top_p)
    # ``step`` is one scalar for the batch or one per row (rows that joined a running batch later).
    keys = jax.vmap(jax.random.fold_in)(state.keys, jnp.broadcast_to(step, state.keys.shape[:1]))
    return jnp.where(state.temperature > 0, draw(scaled, keys), greedy_tokens)


def first_argmax(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (the first of tied maxima), as two plain reductions: XLA:CPU's
    ``argmax`` (a reduction over value-index pairs) took 3.5 ms for 32 x 49,152 logits, this 0.75."""
    vocab = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(index, vocab - 1)  # a row of NaN has no maximum: still a token id


# Tokens per block of the two-level draw: blocks of the vocabulary first, then a token in the block.
DRAW_BLOCK = 256


def draw(scaled: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row from ``softmax(scaled [B, V])`` (``-inf``: never), by inverse transform
    in two levels: a block of ``DRAW_BLOCK`` tokens with probability its mass, then a token of
    that block with probability its share of the block, so ``P(token) = p_token / total``
    exactly (up to fp32 sums). Two uniforms per row from ``keys [B, 2]``, where a Gumbel draw
    (``jax.random.categorical``) makes one per vocabulary entry: 0.55 ms against 16 ms for 32 x
    49,152 on a CPU."""
    batch, vocab = scaled.shape
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    weights = jnp.pad(weights, ((0, 0), (0, -vocab % DRAW_BLOCK))).reshape(batch, -1, DRAW_BLOCK)
    u = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys)

    def pick(masses: jax.Array, u: jax.Array) -> jax.Array:
        # the first index whose running mass passes u x total: never one of mass zero
        running = jnp.cumsum(masses, axis=-1)
        chosen = jnp.sum(running <= (u * running[:, -1])[:, None], axis=-1)
        return jnp.minimum(chosen, masses.shape[-1] - 1).astype(jnp.int32)

    block = pick(weights.sum(axis=-1), u[:, 0])
    within = jnp.take_along_axis(weights, block[:, None, None], axis=1)[:, 0]
    return block * DRAW_BLOCK + pick(within, u[:, 1])


# The nucleus is looked for among each row's largest logits first (``lax.top_k``); only a batch with
# a row whose top-k or nucleus reaches past them searches the whole vocabulary, by bisection
# (XLA's CPU sort of 32 x 49,152 logits took 300 ms, most of a sampled decode step).
NUCLEUS_HEAD = 256


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf every logit outside the row's top-k and outside its top-p nucleus (the smallest
    set of largest logits whose probability after top-k reaches top_p). A row with top_k 0 and
    top_p 1 keeps every logit."""
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    head = min(NUCLEUS_HEAD, vocab)
    largest = jax.lax.top_k(logits, head)[0]  # descending
    threshold, found = _threshold(logits, largest, k, top_p)
    if head < vocab:
        threshold = jax.lax.cond(
            jnp.all(found),
            lambda: threshold,
            lambda: _bisected_threshold(logits, k, top_p),
        )
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _threshold(logits: jax.Array, ordered: jax.Array, k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's smallest kept logit from its ``ordered`` largest ones (descending, all of them or
    a head), and whether that head decided it."""
    n = ordered.shape[-1]
    kth_value = jnp.take_along_axis(ordered, (jnp.minimum(k, n) - 1)[:, None], axis=-1)
    kth_value = jnp.where((k < logits.shape[-1])[:, None], kth_value, -jnp.inf)
    # top-k's probabilities, normalized over every kept logit (not only the head's)
    log_z = jax.nn.logsumexp(jnp.where(logits >= kth_value, logits, -jnp.inf), axis=-1, keepdims=True)
    probs = jnp.exp(jnp.where(jnp.arange(n)[None, :] < k[:, None], ordered, -jnp.inf) - log_z)
    # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p[:, None]
    last_kept = jnp.maximum(keep.sum(axis=-1) - 1, 0)
    nucleus_value = jnp.take_along_axis(ordered, last_kept[:, None], axis=-1)
    nucleus_value = jnp.where((top_p < 1.0)[:, None], nucleus_value, -jnp.inf)
    found = (k <= n) | ((k == logits.shape[-1]) & ((top_p >= 1.0) | ~keep[:, -1]))
    return jnp.maximum(kth_value, nucleus_value), found


def _order_keys(x: jax.Array) -> jax.Array:
    """fp32 values as uint32 keys in the same order (sign flipped, negatives' bits inverted)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_keys(keys: jax.Array) -> jax.Array:
    bits = jnp.where(keys >> 31 == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bisected_threshold(logits: jax.Array, k: jax.Array, top_p: jax.Array) -> jax.Array:
    """What ``_threshold`` gives from the whole vocabulary sorted, without sorting: the k-th
    largest logit is the largest key T with ``count(logit >= T) >= k``, and the nucleus's smallest
    kept logit the smallest key T with ``mass(logit > T) < top_p`` (a logit is kept when the mass
    strictly above it is short of top_p). Both predicates are monotone in T, so 32 halvings of the
    uint32 key range find each exactly; each costs one pass over the logits."""
    logits = logits.astype(jnp.float32)
    keys = _order_keys(logits)
    rows = logits.shape[0]

    def bisect(holds: Any, largest: bool) -> jax.Array:
        # largest=True: the largest T where holds(T) (holds for small T); else the smallest T
        # where it holds (holds for large T). lo and hi bracket the answer throughout.
        def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            lo, hi = bounds
            gap = hi - lo
            mid = lo + gap // 2 + (gap % 2 if largest else 0)
            ok = holds(mid)
            if largest:
                return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
            return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

        lo = jnp.zeros((rows,), jnp.uint32)
        hi = jnp.full((rows,), 0xFFFFFFFF, jnp.uint32)
        return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]

    vocab = logits.shape[-1]
    kth_key = bisect(lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k, largest=True)
    kth_value = jnp.where(k < vocab, _from_order_keys(kth_key), -jnp.inf)
    in_top_k = logits >= kth_value[:, None]
    log_z = jax.nn.logsumexp(jnp.where(in_top_k, logits, -jnp.inf), axis=-1, keepdims=True)
    probs = jnp.where(in_top_k, jnp.exp(logits - log_z), 0.0)
    nucleus_key = bisect(lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1) < top_p, largest=False)
    nucleus_value = jnp.where(top_p < 1.0, _from_order_keys(nucleus_key), -jnp.inf)
    return jnp.maximum(kth_value, nucleus_value)[:, None]
