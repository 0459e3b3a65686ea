"""The inference engine: the one generate loop of afmkit.

The CLI, the server, evaluation, rejection sampling and RL rollouts all generate through
``Engine``. Design:

* Prefill and decode are jitted functions over a preallocated KV cache that each step donates
  and updates in place.
* Shapes come from buckets (batch rounded to a power of two, prompt length to a power of two or
  a multiple of the prefill chunk, attention length to a multiple of ``KV_BLOCK``), so a call
  compiles only when it meets a new bucket; XLA's persistent cache keeps compiled steps across
  processes.
* A decode step attends to the first ``attend_len`` cache positions only (the bucket above the
  longest row), so its cost does not grow with the cache's capacity.
* Each row has its own position, sampling parameters, random key and stop conditions; rows that
  have stopped ride along until the batch ends.
* The host reads a step's tokens while the next step is already running, so per-token Python
  work (detokenizing, stop strings, streaming) overlaps with the device.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.infer.sampling import SamplerMode, SamplerState, SamplingParams, sample
from afmkit.model.kv_cache import KVCache
from afmkit.model.transformer import Params, forward, output_logits

KV_BLOCK = 256  # attention-length and cache-capacity granularity
PREFILL_CHUNK = 512  # longer prompts are prefilled in chunks of this many positions
MIN_PROMPT_BUCKET = 16
MAX_BATCH = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def batch_bucket(n: int) -> int:
    return _next_pow2(n)


def prompt_bucket(n: int) -> int:
    if n <= PREFILL_CHUNK:
        return max(MIN_PROMPT_BUCKET, _next_pow2(n))
    return _round_up(n, PREFILL_CHUNK)


def kv_bucket(n: int) -> int:
    return _round_up(n, KV_BLOCK)


def cache_capacity(longest_prompt: int, max_new_tokens: int) -> int:
    """Cache slots for a batch: room for the padded prompt and every new token, plus one.

    The extra slot keeps every attention read (a bucket of ``KV_BLOCK`` slots) a proper slice
    of the cache: when the read would be the whole buffer, XLA:CPU copies the cache around the
    in-place write on every step.
    """
    return max(kv_bucket(longest_prompt + max_new_tokens), prompt_bucket(longest_prompt)) + 1


def activation_dtype(params: Params) -> Any:
    """fp32 activations on CPUs whatever the weights (bf16 elementwise work is slow there);
    the weights' dtype on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else params["embed"].dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    tokens: jax.Array  # [B] the token each row feeds next
    positions: jax.Array  # [B] where that token sits
    step: jax.Array  # scalar: index of ``tokens`` among the generated tokens


@functools.partial(
    jax.jit, static_argnames=("config", "attend_len", "mode", "activation_dtype"), donate_argnames=("cache",)
)
def _prefill_chunk(
    params: Params,
    cache: KVCache,
    tokens: jax.Array,
    start: jax.Array,
    lengths: jax.Array,
    first: jax.Array,
    sampler: SamplerState,
    *,
    config: ModelConfig,
    attend_len: int,
    mode: SamplerMode,
    activation_dtype: Any,
) -> tuple[KVCache, jax.Array]:
    """Write one chunk of prompt positions into the cache; sample the first new token of every
    row whose last prompt token lies in this chunk (other rows keep ``first``)."""
    batch, chunk = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(chunk), (batch, chunk))
    hidden, cache = forward(
        params, tokens, positions, cache, config=config, attend_len=attend_len, activation_dtype=activation_dtype
    )
    last = lengths - 1 - start
    in_chunk = (last >= 0) & (last < chunk)
    last_hidden = hidden[jnp.arange(batch), jnp.clip(last, 0, chunk - 1)]
    sampled = sample(output_logits(params, last_hidden), sampler, jnp.int32(0), mode=mode)
    return cache, jnp.where(in_chunk, sampled, first)


@functools.partial(
    jax.jit, static_argnames=("config", "attend_len", "mode", "activation_dtype"), donate_argnames=("cache",)
)
def _decode_step(
    params: Params,
    cache: KVCache,
    state: DecodeState,
    sampler: SamplerState,
    *,
    config: ModelConfig,
    attend_len: int,
    mode: SamplerMode,
    activation_dtype: Any,
) -> tuple[KVCache, DecodeState]:
    hidden, cache = forward(
        params,
        state.tokens[:, None],
        state.positions[:, None],
        cache,
        config=config,
        attend_len=attend_len,
        activation_dtype=activation_dtype,
    )
    step = state.step + 1
    tokens = sample(output_logits(params, hidden[:, 0]), sampler, step, mode=mode)
    return cache, DecodeState(tokens=tokens, positions=state.positions + 1, step=step)


@functools.partial(jax.jit, static_argnames=("config", "batch", "capacity", "dtype"))
def _empty_cache(*, config: ModelConfig, batch: int, capacity: int, dtype: Any) -> KVCache:
    return KVCache.zeros(config, batch=batch, capacity=capacity, dtype=dtype)


@dataclasses.dataclass
class StreamEvent:
    """New output of one row: a token, the text it completed (may be empty) and, on the row's
    last event, why it finished (``"stop"``: EOS or a stop string; ``"length"``: max tokens)."""

    index: int
    token: int
    text: str
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    text: str
    tokens: list[int]  # generated ids, the EOS that ended the row included
    prompt_tokens: int
    finish_reason: str
    timings: dict[str, float]


class _RowText:
    """Incremental detokenizer with stop strings for one row.

    Decodes a short window of recent tokens per step (never the whole row) and holds back text
    that could still become a stop string, so streamed text never shows part of one.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""
        self.emitted = 0

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return (text now safe to emit, whether a stop string ended the row)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        if not self.stop:
            return self._emit(len(self.text)), False
        longest = max(len(s) for s in self.stop)
        search_from = max(0, self.emitted - longest)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._emit(len(self.text)), True
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return self._emit(len(self.text) - held), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta


class Engine:
    """Batched, streamed generation over one model's weights."""

    def __init__(
        self,
        config: ModelConfig,
        params: Params,
        tokenizer: Any,
        *,
        eos_ids: Sequence[int] = (),
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_batch = max_batch
        self.activation_dtype = activation_dtype(params)
        # XLA:CPU has no fast single-row (matrix-vector) path for bf16 weights: decode at least
        # two rows there; a second row costs next to nothing when decode is bandwidth-bound.
        on_cpu = jax.default_backend() == "cpu"
        self.min_decode_batch = 2 if on_cpu and params["embed"].dtype == jnp.bfloat16 else 1

    # -- public API --------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Generate for every prompt (token ids); returns one ``Completion`` per prompt."""
        params_list = self._per_prompt(prompts, sampling)
        tokens: list[list[int]] = [[] for _ in prompts]
        texts: list[list[str]] = [[] for _ in prompts]
        finish: list[str] = ["length"] * len(prompts)
        timings: list[dict[str, float]] = [{} for _ in prompts]
        for event in self.stream(prompts, params_list, timings_out=timings):
            tokens[event.index].append(event.token)
            texts[event.index].append(event.text)
            if event.finish_reason:
                finish[event.index] = event.finish_reason
        return [
            Completion("".join(texts[i]), tokens[i], len(prompts[i]), finish[i], timings[i])
            for i in range(len(prompts))
        ]

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams],
        *,
        timings_out: list[dict[str, float]] | None = None,
    ) -> Iterator[StreamEvent]:
        """Yield ``StreamEvent``s as tokens come, for prompts in batches of up to ``max_batch``."""
        params_list = self._per_prompt(prompts, sampling)
        for i, prompt in enumerate(prompts):
            self._check_prompt(i, prompt, params_list[i])
        for lo in range(0, len(prompts), self.max_batch):
            hi = min(lo + self.max_batch, len(prompts))
            batch_timings = timings_out[lo:hi] if timings_out is not None else None
            for event in self._stream_batch(prompts[lo:hi], params_list[lo:hi], batch_timings):
                event.index += lo
                yield event

    # -- internals ---------------------------------------------------------------------------
    def _per_prompt(self, prompts: Sequence[Sequence[int]], sampling: Any) -> list[SamplingParams]:
        if isinstance(sampling, SamplingParams):
            return [sampling] * len(prompts)
        sampling = list(sampling)
        if len(sampling) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts but {len(sampling)} sampling parameter sets")
        return sampling

    def _check_prompt(self, index: int, prompt: Sequence[int], sampling: SamplingParams) -> None:
        if len(prompt) == 0:
            raise UserError(f"prompt {index} is empty; give at least one token")
        context = self.config.max_seq_len
        if len(prompt) >= context:
            raise UserError(
                f"prompt {index} has {len(prompt)} tokens but the model's context is {context}; shorten the prompt"
            )
        if len(prompt) + sampling.max_new_tokens > context:
            raise UserError(
                f"prompt {index} has {len(prompt)} tokens and max_new_tokens is {sampling.max_new_tokens}, "
                f"more than the model's context of {context}; lower max_new_tokens to at most "
                f"{context - len(prompt)} or shorten the prompt"
            )
        bad = [t for t in prompt if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise UserError(
                f"prompt {index} has token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}"
            )

    def _stream_batch(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: list[SamplingParams],
        timings_out: list[dict[str, float]] | None,
    ) -> Iterator[StreamEvent]:
        start_time = time.perf_counter()
        n = len(prompts)
        batch = batch_bucket(n)  # rows prefilled
        rows_total = max(batch, self.min_decode_batch)  # rows decoded
        lengths = [len(p) for p in prompts] + [1] * (rows_total - n)
        longest = max(lengths)
        padded_len = prompt_bucket(longest)
        max_steps = max(s.max_new_tokens for s in sampling)
        capacity = cache_capacity(longest, max_steps)
        padding = [SamplingParams(max_new_tokens=1)] * (rows_total - n)
        mode = SamplerMode.for_batch(sampling)
        sampler = SamplerState.from_params(sampling + padding)

        tokens = np.zeros((batch, padded_len), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt
        lengths_dev = jnp.asarray(lengths, jnp.int32)
        cache = _empty_cache(config=self.config, batch=rows_total, capacity=capacity, dtype=self.activation_dtype)
        first = jnp.zeros((batch,), jnp.int32)
        prefill_sampler = sampler if rows_total == batch else jax.tree.map(lambda a: a[:batch], sampler)
        chunk = min(padded_len, PREFILL_CHUNK)
        for chunk_start in range(0, padded_len, chunk):
            cache, first = _prefill_chunk(
                self.params,
                cache,
                jnp.asarray(tokens[:, chunk_start : chunk_start + chunk]),
                jnp.int32(chunk_start),
                lengths_dev[:batch],
                first,
                prefill_sampler,
                config=self.config,
                attend_len=chunk_start + chunk,
                mode=mode,
                activation_dtype=self.activation_dtype,
            )
        if rows_total > batch:
            first = jnp.pad(first, (0, rows_total - batch))
        state = DecodeState(tokens=first, positions=lengths_dev, step=jnp.int32(0))

        rows = [_RowText(self.tokenizer, s.stop) for s in sampling]
        active = [True] * n
        counts = [0] * n
        finish_times = [0.0] * n

        def emit(host_tokens: np.ndarray) -> Iterator[StreamEvent]:
            """Per-row host work for one step: stop checks, detokenizing, events."""
            for row in range(n):
                if not active[row]:
                    continue
                token = int(host_tokens[row])
                counts[row] += 1
                finish = None
                if token in self.eos_ids:
                    text, finish = rows[row].flush(), "stop"
                else:
                    text, stopped = rows[row].add(token)
                    if stopped:
                        finish = "stop"
                    elif counts[row] >= sampling[row].max_new_tokens:
                        text, finish = text + rows[row].flush(), "length"
                if finish:
                    active[row] = False
                    finish_times[row] = time.perf_counter()
                yield StreamEvent(row, token, text, finish)

        def dispatch(cache: KVCache, state: DecodeState, step: int) -> tuple[KVCache, DecodeState] | None:
            """Start computing the token after ``state``'s (donating ``cache``), unless no row needs it."""
            if not any(active) or step + 1 >= max_steps:
                return None
            attend_len = kv_bucket(longest + step + 1)
            return _decode_step(
                self.params,
                cache,
                state,
                sampler,
                config=self.config,
                attend_len=attend_len,
                mode=mode,
                activation_dtype=self.activation_dtype,
            )

        # The first token streams out before the first decode step is dispatched (which may have
        # to compile). From then on step t+1 is dispatched before step t's tokens are read, so
        # the device computes while the host detokenizes and streams.
        first_host = np.asarray(state.tokens)
        first_token_time = time.perf_counter()
        yield from emit(first_host)
        step = 0
        pending = dispatch(cache, state, step)
        while pending is not None and any(active):
            cache, state = pending
            step += 1
            pending = dispatch(cache, state, step)
            yield from emit(np.asarray(state.tokens))
        if timings_out is not None:
            ttft = first_token_time - start_time
            for row in range(n):
                decode_s = finish_times[row] - first_token_time
                timings_out[row].update(
                    ttft_s=ttft,
                    total_s=finish_times[row] - start_time,
                    decode_s=decode_s,
                    decode_tok_s=(counts[row] - 1) / decode_s if decode_s > 0 and counts[row] > 1 else 0.0,
                )
