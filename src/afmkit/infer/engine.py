"""The inference engine: the one generate loop of afmkit.

The CLI, the server, evaluation, rejection sampling and RL rollouts all generate through
``Engine``. Design:

* Prefill and decode are jitted functions over a KV cache that each step donates and updates in
  place. The cache is paged by default (``KVSettings``): one pool of fixed-size blocks shared
  by every row and a block table per row, so memory follows the tokens in flight; the pool
  grows a quarter at a time (``pool_size``) as rows need blocks and shrinks back when the batch
  goes idle. A row
  reserves the blocks its prompt plus ``max_new_tokens`` can need when it is admitted, so a
  running row never runs out; a request that does not fit the pool waits. The contiguous cache
  (every row owns ``capacity`` positions) remains as ``KVSettings(layout="contiguous")``.
* With the paged cache, prompts are prefilled in chunks between decode steps (chunked prefill):
  each step runs the running rows' next tokens and then up to ``step_tokens`` minus that many
  prompt positions of the requests being admitted (oldest first), so a long prompt never stalls
  the decode batch for more than one chunk.
* Shapes come from buckets (batch rounded to a power of two, prompt length to a power of two or
  a multiple of the prefill chunk, attention length to a multiple of ``KV_BLOCK``), so a call
  compiles only when it meets a new bucket; XLA's persistent cache keeps compiled steps across
  processes.
* A decode step attends to the first ``attend_len`` cache positions only (the bucket above the
  longest row), so its cost does not grow with the cache's capacity.
* Rows live in the slots of a shared KV cache (``DecodeBatch``). Each row has its own position,
  step, sampling parameters, random key, stop conditions and LoRA adapter (a bank of adapters
  gathered per row, so one batch mixes adapters and the bare base). New requests are prefilled
  into free slots and join the running decode batch at the next step (continuous batching);
  finished rows free their slots at once. ``Engine.generate``/``stream`` and the server's
  scheduler are both clients of this one loop.
* The host reads a step's tokens while the next step is already running, so per-token Python
  work (detokenizing, stop strings, streaming) overlaps with the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from afmkit import kernels, runtime
from afmkit.adapters.lora import AdapterBank, LoraAdapter, RowAdapters, SingleAdapter, single
from afmkit.config import ModelConfig, check_context
from afmkit.errors import UserError
from afmkit.infer.sampling import SamplerMode, SamplerState, SamplingParams, count_tokens, sample
from afmkit.model.kv_cache import UNALLOCATED, KVCache, PagedKVCache
from afmkit.model.transformer import Params, forward, output_logits
from afmkit.sharding import inference as mesh_inference

KV_BLOCK = 256  # attention-length and cache-capacity granularity
PREFILL_CHUNK = 512  # longer prompts are prefilled in chunks of this many positions
MIN_PROMPT_BUCKET = 16
MAX_BATCH = 64
STOP_CHECK_EVERY = 32  # tokens of a row between two ``stop_when`` checks in ``Engine.stream``


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


@dataclasses.dataclass(frozen=True)
class KVSettings:
    """How a decode batch keeps its keys and values.

    ``layout``: ``"paged"`` (a block pool and per-row block tables) or ``"contiguous"`` (every
    row owns ``capacity`` positions, prefilled whole at admission). ``dtype``: ``"auto"`` (the
    activations' dtype) or ``"int8"`` (paged only: int8 codes with one fp32 scale per position
    and KV head; about a quarter of fp32's bytes). ``page``: positions per block.
    ``step_tokens``: the paged batch's per-step token budget (decode rows first, then prompt
    chunks). ``pool_tokens``: the most positions the pool may hold (None: ``slots x capacity``,
    what the contiguous cache holds)."""

    # Contiguous by default: paged generation measured 0.88x contiguous's tokens/s at 32 rows
    # (0.97x at 1, 0.94x at 8; its chunked prefill takes four calls where contiguous takes one;
    # benchmarks/kv_layouts.py, docs/serving.md); the server picks paged for its memory.
    layout: str = "contiguous"
    dtype: str = "auto"
    page: int = 16
    step_tokens: int = 256
    pool_tokens: int | None = None

    def check(self) -> None:
        if self.layout not in ("paged", "contiguous"):
            raise UserError(f"KV cache layout {self.layout!r} is not one of: paged, contiguous")
        if self.dtype not in ("auto", "int8"):
            raise UserError(f"KV cache dtype {self.dtype!r} is not one of: auto, int8")
        if self.dtype == "int8" and self.layout != "paged":
            raise UserError("an int8 KV cache needs the paged layout; drop --kv-layout contiguous")
        if self.page < 1 or KV_BLOCK % self.page:
            raise UserError(f"KV page {self.page} must divide {KV_BLOCK}")
        if self.step_tokens < MIN_PROMPT_BUCKET:
            raise UserError(f"step_tokens must be at least {MIN_PROMPT_BUCKET}, got {self.step_tokens}")
        if self.pool_tokens is not None and self.pool_tokens < self.page:
            raise UserError(f"the KV pool must hold at least one block ({self.page} tokens), got {self.pool_tokens}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    tokens: jax.Array  # [B] the token each row feeds next
    positions: jax.Array  # [B] where that token sits
    step: jax.Array  # [B] (or a scalar): index of ``tokens`` among the row's generated tokens


@functools.partial(
    jax.jit,
    static_argnames=("config", "attend_len", "mode", "activation_dtype", "cache_sharding"),
    donate_argnames=("cache",),
)
def _prefill_chunk(
    params: Params,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    first: jax.Array,
    sampler: SamplerState,
    lora: RowAdapters | None = None,
    *,
    config: ModelConfig,
    attend_len: int,
    mode: SamplerMode,
    activation_dtype: Any,
    cache_sharding: NamedSharding | None = None,
) -> tuple[KVCache, jax.Array]:
    """Write one chunk of prompt positions into the first rows of the cache; sample the first
    new token of every row whose last prompt token lies in this chunk (others keep ``first``)."""
    cache, first = _prefill_rows(
        params,
        cache,
        tokens,
        lengths,
        first,
        sampler,
        lora,
        config=config,
        attend_len=attend_len,
        mode=mode,
        activation_dtype=activation_dtype,
    )
    return _pin(cache, cache_sharding), first


def _pin(cache: Any, sharding: Any) -> Any:
    """The cache kept in its mesh layout across a step (``sharding``: None without a mesh; for a
    paged pool, its shardings by array rank), so the donated input and the output match and the
    next step compiles for the same layout. A paged cache leaves without its call's tables."""
    if isinstance(cache, PagedKVCache):
        cache = dataclasses.replace(cache, tables=None)
    if sharding is None:
        return cache
    by_rank = dict(sharding) if isinstance(sharding, tuple) else None
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, by_rank[a.ndim] if by_rank else sharding), cache)


def _prefill_rows(
    params: Params,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    first: jax.Array,
    sampler: SamplerState,
    lora: RowAdapters | None,
    *,
    config: ModelConfig,
    attend_len: int,
    mode: SamplerMode,
    activation_dtype: Any,
) -> tuple[KVCache, jax.Array]:
    # The chunk is the last positions before attend_len in every row (the caller's chunk_start +
    # chunk), so attention may skip the keys after each block of its queries (queries_last).
    batch, chunk = tokens.shape
    start = attend_len - chunk
    positions = start + jnp.broadcast_to(jnp.arange(chunk), (batch, chunk))
    hidden, cache = forward(
        params,
        tokens,
        positions,
        cache,
        config=config,
        attend_len=attend_len,
        activation_dtype=activation_dtype,
        adapters=lora,
        queries_last=True,
    )
    last = lengths - 1 - start
    in_chunk = (last >= 0) & (last < chunk)
    last_hidden = hidden[jnp.arange(batch), jnp.clip(last, 0, chunk - 1)]
    sampled = sample(output_logits(params, last_hidden), sampler, jnp.int32(0), mode=mode)
    return cache, jnp.where(in_chunk, sampled, first)


@functools.partial(
    jax.jit,
    static_argnames=("config", "attend_len", "mode", "activation_dtype", "cache_sharding"),
    donate_argnames=("cache",),
)
def _prefill_slots_chunk(
    params: Params,
    cache: KVCache,
    slots: jax.Array,
    tokens: jax.Array,
    lengths: jax.Array,
    first: jax.Array,
    sampler: SamplerState,
    lora: RowAdapters | None = None,
    *,
    config: ModelConfig,
    attend_len: int,
    mode: SamplerMode,
    activation_dtype: Any,
    cache_sharding: NamedSharding | None = None,
) -> tuple[KVCache, jax.Array]:
    """``_prefill_chunk`` for rows at any slots of a running batch's cache: the slots' first
    ``attend_len`` positions are gathered, prefilled and written back (other rows untouched)."""
    rows = KVCache(k=[k[slots, ..., :attend_len] for k in cache.k], v=[v[slots, :, :attend_len] for v in cache.v])
    rows, first = _prefill_rows(
        params,
        rows,
        tokens,
        lengths,
        first,
        sampler,
        lora,
        config=config,
        attend_len=attend_len,
        mode=mode,
        activation_dtype=activation_dtype,
    )
    cache = KVCache(
        k=[k.at[slots, ..., :attend_len].set(r) for k, r in zip(cache.k, rows.k)],
        v=[v.at[slots, :, :attend_len].set(r) for v, r in zip(cache.v, rows.v)],
    )
    return _pin(cache, cache_sharding), first


@functools.partial(
    jax.jit,
    static_argnames=("config", "attend_len", "mode", "activation_dtype", "cache_sharding"),
    donate_argnames=("cache",),
)
def _decode_step(
    params: Params,
    cache: KVCache,
    state: DecodeState,
    sampler: SamplerState,
    lora: RowAdapters | None = None,
    counts: jax.Array | None = None,
    tables: jax.Array | None = None,
    *,
    config: ModelConfig,
    attend_len: int,
    mode: SamplerMode,
    activation_dtype: Any,
    cache_sharding: NamedSharding | None = None,
) -> tuple[KVCache, DecodeState, jax.Array | None]:
    """One token for each of the first ``len(state.tokens)`` rows of the cache; ``counts``
    (``[B, vocab]`` tokens generated so far, when a row has penalties) is applied and updated.
    ``tables``: the rows' block tables when ``cache`` is a paged pool."""
    if tables is not None:
        cache = dataclasses.replace(cache, tables=tables)
    hidden, cache = forward(
        params,
        state.tokens[:, None],
        state.positions[:, None],
        cache,
        config=config,
        attend_len=attend_len,
        activation_dtype=activation_dtype,
        adapters=lora,
    )
    step = state.step + 1
    tokens = sample(output_logits(params, hidden[:, 0]), sampler, step, mode=mode, counts=counts)
    counts = None if counts is None else count_tokens(counts, tokens)
    state = DecodeState(tokens=tokens, positions=state.positions + 1, step=step)
    return _pin(cache, cache_sharding), state, counts


@functools.partial(
    jax.jit,
    static_argnames=("config", "attend_len", "mode", "activation_dtype", "cache_sharding"),
    donate_argnames=("cache",),
)
def _paged_prefill(
    params: Params,
    cache: PagedKVCache,
    tables: jax.Array,
    tokens: jax.Array,
    starts: jax.Array,
    lengths: jax.Array,
    sampler: SamplerState,
    lora: RowAdapters | None = None,
    *,
    config: ModelConfig,
    attend_len: int,
    mode: SamplerMode,
    activation_dtype: Any,
    cache_sharding: Any = None,
) -> tuple[PagedKVCache, jax.Array]:
    """One chunk of each row's prompt, ``tokens [B, T]`` from position ``starts[b]``, written
    through the rows' block ``tables``; returns the first new token of every row (meaningful for
    rows whose last prompt position, ``lengths[b] - 1``, lies in this chunk)."""
    batch, chunk = tokens.shape
    positions = starts[:, None] + jnp.arange(chunk)[None, :]
    hidden, cache = forward(
        params,
        tokens,
        positions,
        dataclasses.replace(cache, tables=tables),
        config=config,
        attend_len=attend_len,
        activation_dtype=activation_dtype,
        adapters=lora,
    )
    last = jnp.clip(lengths - 1 - starts, 0, chunk - 1)
    sampled = sample(output_logits(params, hidden[jnp.arange(batch), last]), sampler, jnp.int32(0), mode=mode)
    return _pin(cache, cache_sharding), sampled


@functools.partial(jax.jit, static_argnames=("config", "blocks", "page", "dtype", "quantized", "sharding", "lazy"))
def _empty_pool(
    *,
    config: ModelConfig,
    blocks: int,
    page: int,
    dtype: Any,
    quantized: bool,
    sharding: Any = None,
    lazy: bool = False,
) -> PagedKVCache:
    """A zeroed block pool, made in place in its mesh layout; ``lazy``: its pages committed by the
    OS as blocks are first written (``kernels.lazy_zeros``)."""
    zeros = kernels.lazy_zeros if lazy else jnp.zeros
    cache = PagedKVCache.zeros(config, blocks=blocks, page=page, dtype=dtype, quantized=quantized, zeros=zeros)
    return _pin(cache, sharding)


@functools.partial(jax.jit, static_argnames=("blocks", "sharding"))  # a larger output: nothing to donate to
def _grown(array: jax.Array, *, blocks: int, sharding: Any = None) -> jax.Array:
    """One pool array with zeroed blocks appended up to ``blocks``."""
    grown = jnp.concatenate([array, jnp.zeros((blocks - array.shape[0], *array.shape[1:]), array.dtype)])
    return _pin(grown, sharding)


def _grow_pool(cache: PagedKVCache, *, blocks: int, sharding: Any = None) -> None:
    """Append zeroed blocks to every array of ``cache`` up to ``blocks``, in place; existing
    blocks keep their index. One array at a time, each old one dropped as soon as its copy
    exists, so growing holds the new pool plus one layer's array, never two whole pools."""
    for arrays in (cache.k, cache.v, cache.k_scale, cache.v_scale):
        for i in range(len(arrays)):
            arrays[i] = _grown(arrays[i], blocks=blocks, sharding=sharding)


def pool_size(blocks: int) -> int:
    """The pool size (in blocks) that holds ``blocks``: the next of 1, 1.25, 1.5 and 1.75 times a
    power of two. Every size is a shape the steps compile for, so sizes come from a short ladder;
    four steps an octave waste at most a quarter of the pool, where doubling wasted up to half."""
    octave = 1 << max(0, (blocks - 1).bit_length() - 1)  # the power of two at or below blocks
    for quarters in (4, 5, 6, 7, 8):
        if blocks <= octave * quarters // 4:
            return octave * quarters // 4
    return 2 * octave


@functools.partial(jax.jit, static_argnames=("config", "batch", "capacity", "dtype", "sharding"))
def _empty_cache(
    *, config: ModelConfig, batch: int, capacity: int, dtype: Any, sharding: NamedSharding | None = None
) -> KVCache:
    """A zeroed cache, made in place in its mesh layout (never whole on one device first)."""
    return _pin(KVCache.zeros(config, batch=batch, capacity=capacity, dtype=dtype), sharding)


# stop_when(prompt index, its tokens so far) -> a finish reason to end the row now, or None
StopCheck = Callable[[int, Sequence[int]], "str | None"]


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


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request: a prompt (token ids), its sampling and optionally a LoRA adapter.
    ``index`` is copied into the request's ``StreamEvent``s so a caller can route them."""

    prompt: Sequence[int]
    sampling: SamplingParams
    adapter: LoraAdapter | None = None
    index: int = 0
    row: _Row | None = dataclasses.field(default=None, repr=False)  # set when admitted


@dataclasses.dataclass(eq=False)
class _Row:
    """Host-side state of a request while it holds a slot."""

    request: Request
    slot: int
    bank_slot: int
    text: _RowText
    start_time: float
    count: int = 0  # tokens emitted
    dispatched: int = 0  # decode steps dispatched for this row since it joined
    prefilled: int = 0  # prompt positions in the cache (paged: grows chunk by chunk)
    blocks: list[int] = dataclasses.field(default_factory=list)  # paged: the row's blocks, in order
    reserved: int = 0  # paged: blocks held back for the row's prompt and max_new_tokens
    finished: bool = False
    first_token_time: float = 0.0
    finish_time: float = 0.0

    @property
    def next_position(self) -> int:
        """Where the token fed by the next decode step sits."""
        return len(self.request.prompt) + self.dispatched


class _BankEntry:
    """The adapter in one bank slot, held weakly: the bank is a device copy, not a cache. How
    long an adapter stays in memory is the caller's (the server's ``AdapterRegistry``'s) to
    decide; a slot whose adapter is gone counts as least recently used, so it is reused first."""

    def __init__(self, adapter: LoraAdapter, refs: int = 0, last_used: float = 0.0) -> None:
        self._adapter, self.refs, self._last_used = weakref.ref(adapter), refs, last_used

    @property
    def adapter(self) -> LoraAdapter | None:
        return self._adapter()

    @property
    def last_used(self) -> float:
        return self._last_used if self._adapter() is not None else -math.inf

    @last_used.setter
    def last_used(self, value: float) -> None:
        self._last_used = value


_MODE_ORDER = [SamplerMode.GREEDY, SamplerMode.SAMPLE, SamplerMode.FILTERED]


class DecodeBatch:
    """A running decode batch: rows in the slots of one shared KV cache (continuous batching).

    ``admit`` prefills new requests into free slots (several at once when they arrive together)
    and emits their first tokens; ``step`` dispatches the next decode step for every row that
    still needs tokens and returns the previous step's tokens as events (one step in flight, so
    the device computes while the host detokenizes). Rows finish on their own (EOS, a stop
    string, ``max_new_tokens``, ``cancel``) and free their slot for the next request.

    A decode step runs the lowest ``2**k`` slots that cover every row needing a token (rows are
    given the lowest free slot) and attends to the bucket above the longest row, so its cost
    follows the work, not the cache's capacity. LoRA adapters live in an ``AdapterBank`` with
    ``adapter_slots`` slots; each row gathers its own (slot 0: the bare base).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        slots: int,
        capacity: int,
        adapter_slots: int = 0,
        adapters: Sequence[LoraAdapter] = (),
        kv: KVSettings | None = None,
    ) -> None:
        self.engine = engine
        self.n_slots = slots
        self.capacity = capacity
        runtime.watch_compiled_code()
        self.kv = kv or engine.kv
        self.kv.check()
        self.paged = self.kv.layout == "paged"
        if self.paged:
            self.page = self.kv.page
            self.row_blocks = -(-capacity // self.page)  # block-table width: a row's most blocks
            pool_tokens = self.kv.pool_tokens or slots * self.row_blocks * self.page
            self.max_blocks = max(1, pool_tokens // self.page)
            self.cache_sharding = engine.paged_kv_sharding()
            # On CPUs the pool is reserved at its largest once, its pages committed by the OS as
            # blocks are first written: memory follows the tokens in flight, the pool's shape (and
            # so every compiled step) never changes, and it never holds two pools to grow.
            # Elsewhere it starts small and grows a quarter at a time (``pool_size``).
            self.lazy_pool = kernels.on_cpu() and self.cache_sharding is None
            self.min_blocks = self.max_blocks if self.lazy_pool else min(self.max_blocks, 4 * KV_BLOCK // self.page)
            self.pool_written = False  # a block was handed out since the pool was made
            self.tables = np.full((slots, self.row_blocks), UNALLOCATED, np.int32)
            self.reserved = 0  # blocks promised to admitted rows
            self.prefilling: list[_Row] = []  # admitted rows whose prompt is not all in the cache
            self._reset_pool()
        else:
            self.cache_sharding = engine.kv_cache_sharding(rows=slots)
            self.cache = _empty_cache(
                config=engine.config,
                batch=slots,
                capacity=capacity,
                dtype=engine.activation_dtype,
                sharding=self.cache_sharding,
            )
        self.rows: list[_Row | None] = [None] * slots
        zeros = jnp.zeros((slots,), jnp.int32)
        self.state = DecodeState(tokens=zeros, positions=zeros, step=zeros)
        self.sampler = SamplerState.from_params([SamplingParams(max_new_tokens=1)] * slots)
        self.row_bank_slots = zeros
        self.adapter_slots = max(adapter_slots, len(adapters) + 1 if adapters else 0)
        self.bank: AdapterBank | None = None
        self.bank_entries: list[_BankEntry | None] = []
        self._uniform: tuple[Any, SingleAdapter] | None = None  # (adapter's weak ref, it in the activations' dtype)
        if adapters:
            self._new_bank(adapters)
        self.mode = SamplerMode.GREEDY
        self.inflight: list[tuple[jax.Array, list[_Row | None]]] = []
        self.counts: jax.Array | None = None  # [slots, vocab] generated tokens, once a row has penalties

    # -- state -------------------------------------------------------------------------------
    @property
    def active_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def free_slots(self) -> int:
        return self.n_slots - self.active_rows

    @property
    def busy(self) -> bool:
        return self.active_rows > 0 or bool(self.inflight)

    # -- the paged pool ------------------------------------------------------------------------
    def _reset_pool(self) -> None:
        self.cache = _empty_pool(
            config=self.engine.config,
            blocks=self.min_blocks,
            page=self.page,
            dtype=self.engine.activation_dtype,
            quantized=self.kv.dtype == "int8",
            sharding=self.cache_sharding,
            lazy=self.lazy_pool,
        )
        self.pool_written = False
        # Popped from the end: lowest first, so the blocks in use (the committed pages) stay dense.
        self.free_blocks = list(range(self.min_blocks - 1, -1, -1))

    @property
    def pool_blocks(self) -> int:
        """Blocks the pool holds now (it grows up to ``max_blocks``)."""
        return self.cache.n_blocks if self.paged else 0

    def _blocks_for(self, request: Request) -> int:
        return -(-(len(request.prompt) + request.sampling.max_new_tokens) // self.page)

    def _back(self, row: _Row, positions: int) -> None:
        """Give ``row`` blocks for its first ``positions`` positions, growing the pool if needed
        (its reservation guarantees the pool may grow that far)."""
        while len(row.blocks) * self.page < positions:
            if not self.free_blocks:
                old = self.cache.n_blocks
                new = min(self.max_blocks, pool_size(old + 1))
                if new <= old:
                    raise RuntimeError("KV pool exhausted despite reservations")  # a bug, not a user error
                _grow_pool(self.cache, blocks=new, sharding=self.cache_sharding)
                self.free_blocks = list(range(new - 1, old - 1, -1)) + self.free_blocks
            block = self.free_blocks.pop()
            self.pool_written = True
            self.tables[row.slot, len(row.blocks)] = block
            row.blocks.append(block)

    def _tables(self, rows: Sequence[_Row | None], attend_len: int) -> jax.Array:
        """Block tables for one call: one line per row (UNALLOCATED for None), ``attend_len`` wide.
        A fresh array: the host table changes while a dispatched step may still read it."""
        width = -(-attend_len // self.page)
        out = np.full((len(rows), width), UNALLOCATED, np.int32)
        for i, row in enumerate(rows):
            if row is not None:
                n = min(width, self.row_blocks)
                out[i, :n] = self.tables[row.slot, :n]
        return jnp.asarray(out)

    # -- adapters ----------------------------------------------------------------------------
    def _new_bank(self, adapters: Sequence[LoraAdapter]) -> None:
        self.bank = AdapterBank.for_adapters(self.engine.config, list(adapters), slots=self.adapter_slots)
        self.bank_entries = [None] + [_BankEntry(a) for a in adapters]
        self.bank_entries += [None] * (self.adapter_slots - len(self.bank_entries))

    def _step_adapters(self, used: Sequence[int], row_slots: Any) -> Any:
        """A step's ``adapters``: None when no row that counts has one (the base model's own code);
        the adapter itself when they all have the same one; else the bank, each row gathering its
        own slot. ``used``: the bank slots of the rows whose output counts; ``row_slots``: every
        row's. Reading one adapter in place spares the per-row copy a gather makes, which took nearly
        half of a one-row decode step (``benchmarks/decode_profile.py``)."""
        slots = set(used)
        if self.bank is None or not any(slots):
            return None
        entry = self.bank_entries[min(slots)] if len(slots) == 1 else None
        adapter = None if entry is None else entry.adapter
        if adapter is None:
            return self.bank.rows(row_slots)
        if self._uniform is None or self._uniform[0]() is not adapter:
            # Converted once, not on every step; fp16 -> fp32 rounds nothing (bf16: the step's own rounding).
            weights = adapter.astype(self.engine.activation_dtype)
            self._uniform = (weakref.ref(adapter), single(weights))
        return self._uniform[1]

    def _reserve_bank_slot(self, adapter: LoraAdapter | None) -> int | None:
        """The bank slot serving ``adapter`` (loading it if needed), or None if none is free now."""
        if adapter is None:
            return 0
        if self.adapter_slots < 2:
            raise UserError("this batch has no adapter slots; create it with adapter_slots >= 2")
        now = time.perf_counter()
        for slot, entry in enumerate(self.bank_entries):
            if entry is not None and entry.adapter is adapter:
                entry.refs += 1
                entry.last_used = now
                return slot
        if self.bank is None:
            self.adapter_slots = max(self.adapter_slots, 2)
            self._new_bank([adapter])
            self.bank_entries[1].refs, self.bank_entries[1].last_used = 1, now
            return 1
        if not self.bank.fits(adapter):  # a larger rank or new weights: resident slots stay put
            self.bank = self.bank.grown_for(adapter)
        free = [s for s in range(1, self.adapter_slots) if self.bank_entries[s] is None]
        if not free:
            idle = [s for s in range(1, self.adapter_slots) if self.bank_entries[s].refs == 0]
            if not idle:
                return None
            free = [min(idle, key=lambda s: self.bank_entries[s].last_used)]
        slot = free[0]
        self.bank.put(slot, adapter)
        self.bank_entries[slot] = _BankEntry(adapter, refs=1, last_used=now)
        return slot

    def _release(self, row: _Row) -> None:
        if self.paged:
            if self.rows[row.slot] is row:
                self.tables[row.slot] = UNALLOCATED
            self.free_blocks.extend(reversed(row.blocks))
            self.reserved -= row.reserved
            row.blocks, row.reserved = [], 0
            if row in self.prefilling:
                self.prefilling.remove(row)
        if self.rows[row.slot] is row:
            self.rows[row.slot] = None
        entry = self.bank_entries[row.bank_slot] if row.bank_slot else None
        if entry is not None:
            entry.refs -= 1

    # -- admission ---------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """A ``UserError`` if ``request`` can never run in this batch."""
        check_context(
            len(request.prompt) + request.sampling.max_new_tokens,
            self.capacity - 1,
            what=f"the prompt ({len(request.prompt)} tokens) plus max_tokens ({request.sampling.max_new_tokens})",
            fix="shorten the prompt or lower max_tokens",
            whose="this batch's context",
        )
        if self.paged and self._blocks_for(request) > self.max_blocks:
            raise UserError(
                f"the prompt ({len(request.prompt)} tokens) plus max_tokens ({request.sampling.max_new_tokens}) "
                f"exceed the KV pool ({self.max_blocks * self.page} tokens); shorten the prompt or lower max_tokens"
            )

    def admit(self, requests: Sequence[Request]) -> tuple[list[Request], list[tuple[Request, StreamEvent]]]:
        """Prefill as many of ``requests`` as fit now; returns (admitted, their first-token events).

        If it raises, none of ``requests`` holds a slot afterwards (rows already running are
        untouched, unless the device failed mid-step: see ``healthy``)."""
        rows: list[_Row] = []
        try:
            return self._admit(requests, rows)
        except BaseException:
            for row in rows:
                row.finished = True
                row.request.row = None
                self._release(row)
            raise

    @property
    def healthy(self) -> bool:
        """False once a failed step left the donated KV cache deleted: the batch cannot run on."""
        return not any(leaf.is_deleted() for leaf in jax.tree.leaves(self.cache))

    def _admit(
        self, requests: Sequence[Request], rows: list[_Row]
    ) -> tuple[list[Request], list[tuple[Request, StreamEvent]]]:
        now = time.perf_counter()
        for request in requests:
            self.check(request)
            free = [s for s in range(self.n_slots) if self.rows[s] is None]
            if not free:
                break
            if self.paged:
                if self.reserved + self._blocks_for(request) > self.max_blocks:
                    break  # the pool is promised to running rows: wait (in order) for some to finish
                # Its prefill runs in later steps, where a failure could not be told apart from
                # the batch's: what can fail for this request alone (its sampler) fails here.
                SamplerState.from_params([request.sampling])
            bank_slot = self._reserve_bank_slot(request.adapter)
            if bank_slot is None:
                continue
            row = _Row(request, free[0], bank_slot, _RowText(self.engine.tokenizer, request.sampling.stop), now)
            request.row = row
            self.rows[row.slot] = row
            rows.append(row)
            if self.paged:
                row.reserved = self._blocks_for(request)
                self.reserved += row.reserved
                self.prefilling.append(row)
        if not rows:
            return [], []
        if self.paged:  # prefilled chunk by chunk by the next steps
            return [r.request for r in rows], []
        groups = self._groups(rows)
        firsts = [self._prefill(group, padding)[: len(group)] for group, padding in groups]
        rows = [row for group, _ in groups for row in group]
        first = firsts[0] if len(firsts) == 1 else jnp.concatenate(firsts)
        for row in rows:
            row.prefilled = len(row.request.prompt)
        return [r.request for r in rows], self._start_decoding(rows, first)

    def _start_decoding(self, rows: list[_Row], first: jax.Array) -> list[tuple[Request, StreamEvent]]:
        """Rows whose prompt is all in the cache join the decode batch with their first tokens."""
        slots = jnp.asarray([r.slot for r in rows], jnp.int32)
        lengths = jnp.asarray([len(r.request.prompt) for r in rows], jnp.int32)
        self.state = DecodeState(
            tokens=self.state.tokens.at[slots].set(first),
            positions=self.state.positions.at[slots].set(lengths),
            step=self.state.step.at[slots].set(0),
        )
        if self.counts is None and any(r.request.sampling.penalized for r in rows):
            self.counts = jnp.zeros((self.n_slots, self.engine.config.vocab_size), jnp.int32)
        if self.counts is not None:  # each new row has generated its first token only
            vocab = self.counts.shape[1]
            self.counts = self.counts.at[slots].set(jax.nn.one_hot(first, vocab, dtype=jnp.int32))
        new_sampler = SamplerState.from_params([r.request.sampling for r in rows])
        self.sampler = jax.tree.map(lambda full, new: full.at[slots].set(new), self.sampler, new_sampler)
        if self.bank is not None:
            self.row_bank_slots = self.row_bank_slots.at[slots].set(jnp.asarray([r.bank_slot for r in rows]))
        host = np.asarray(first)
        events = []
        for row, token in zip(rows, host):
            row.first_token_time = time.perf_counter()
            events.extend(self._emit(row, int(token)))
        return events

    def _prefill_step(self, decoding: int) -> list[tuple[Request, StreamEvent]]:
        """One chunk of the waiting prompts (oldest first): the step's token budget, less the
        ``decoding`` tokens of the decode step, sets the call's shape, and the shape's padding
        is filled with more prompt; rows whose prompt completes join."""
        engine = self.engine
        budget = max(self.kv.step_tokens - decoding, MIN_PROMPT_BUCKET)
        chunks: list[tuple[_Row, int]] = []
        for row in self.prefilling:
            if budget <= 0:
                break
            n = min(len(row.request.prompt) - row.prefilled, budget)
            chunks.append((row, n))
            budget -= n
        size = batch_bucket(len(chunks))
        width = max(MIN_PROMPT_BUCKET, _next_pow2(max(n for _, n in chunks)))
        attend_len = kv_bucket(max(row.prefilled + n for row, n in chunks))

        # The call's [size, width] shape is computed whole: fill its padding with more prompt
        # (longer pieces of these rows, then rows waiting behind them), never reading past
        # attend_len, so the call costs what the budget chose and does more of the work.
        def fits(row: _Row) -> int:
            return min(len(row.request.prompt) - row.prefilled, width, attend_len - row.prefilled)

        chunks = [(row, max(n, fits(row))) for row, n in chunks]
        for row in self.prefilling[len(chunks) :]:
            if len(chunks) == size:
                break
            if fits(row) > 0:
                chunks.append((row, fits(row)))
        tokens = np.zeros((size, width), np.int32)
        starts = np.zeros((size,), np.int32)
        lengths = np.ones((size,), np.int32)
        for i, (row, n) in enumerate(chunks):
            tokens[i, :n] = row.request.prompt[row.prefilled : row.prefilled + n]
            starts[i], lengths[i] = row.prefilled, len(row.request.prompt)
            self._back(row, row.prefilled + n)
        rows: list[_Row | None] = [row for row, _ in chunks] + [None] * (size - len(chunks))
        sampling = [r.request.sampling for r, _ in chunks] + [SamplingParams(max_new_tokens=1)] * (size - len(chunks))
        lora = self._step_adapters([r.bank_slot for r, _ in chunks], [r.bank_slot if r else 0 for r in rows])
        self.cache, first = _paged_prefill(
            engine.params,
            self.cache,
            self._tables(rows, attend_len),
            jnp.asarray(tokens),
            jnp.asarray(starts),
            jnp.asarray(lengths),
            SamplerState.from_params(sampling),
            lora,
            config=engine.config,
            attend_len=attend_len,
            mode=SamplerMode.for_batch(sampling),
            activation_dtype=engine.activation_dtype,
            cache_sharding=self.cache_sharding,
        )
        done = []
        for i, (row, n) in enumerate(chunks):
            row.prefilled += n
            if row.prefilled == len(row.request.prompt):
                self.prefilling.remove(row)
                done.append(i)
        if not done:
            return []
        return self._start_decoding([chunks[i][0] for i in done], first[jnp.asarray(done)])

    def _groups(self, rows: list[_Row]) -> list[tuple[list[_Row], list[int]]]:
        """Prefill groups of power-of-two size: padded with free slots when there are enough,
        else split (8 + 4 + 1 ...)."""
        free = [s for s in range(self.n_slots) if self.rows[s] is None]
        size = batch_bucket(len(rows))
        if size - len(rows) <= len(free):
            groups = [(rows, free[: size - len(rows)])]
        else:
            groups, rest = [], list(rows)
            while rest:
                size = 1 << (len(rest).bit_length() - 1)
                groups.append((rest[:size], []))
                rest = rest[size:]
        return groups

    def _prefill(self, rows: list[_Row], padding: list[int]) -> jax.Array:
        engine = self.engine
        slots = [r.slot for r in rows] + padding
        size = len(slots)
        lengths = [len(r.request.prompt) for r in rows] + [1] * len(padding)
        padded_len = prompt_bucket(max(lengths))
        tokens = np.zeros((size, padded_len), np.int32)
        for i, row in enumerate(rows):
            tokens[i, : lengths[i]] = row.request.prompt
        sampling = [r.request.sampling for r in rows] + [SamplingParams(max_new_tokens=1)] * len(padding)
        sampler = SamplerState.from_params(sampling)
        mode = SamplerMode.for_batch(sampling)
        lora = self._step_adapters([r.bank_slot for r in rows], [r.bank_slot for r in rows] + [0] * len(padding))
        lengths_dev = jnp.asarray(lengths, jnp.int32)
        first = jnp.zeros((size,), jnp.int32)
        direct = slots == list(range(size))  # the first rows of the cache: no gather/scatter
        slots_dev = jnp.asarray(slots, jnp.int32)
        chunk = min(padded_len, PREFILL_CHUNK)
        for chunk_start in range(0, padded_len, chunk):
            common = dict(
                config=engine.config,
                attend_len=chunk_start + chunk,
                mode=mode,
                activation_dtype=engine.activation_dtype,
                cache_sharding=self.cache_sharding,
            )
            args = (jnp.asarray(tokens[:, chunk_start : chunk_start + chunk]), lengths_dev)
            if direct:
                self.cache, first = _prefill_chunk(engine.params, self.cache, *args, first, sampler, lora, **common)
            else:
                self.cache, first = _prefill_slots_chunk(
                    engine.params, self.cache, slots_dev, *args, first, sampler, lora, **common
                )
        return first

    def cancel(self, request: Request) -> None:
        """Stop ``request`` now (e.g. its client went away) and free its slot."""
        for row in self.rows:
            if row is not None and row.request is request:
                row.finished = True
                row.finish_time = time.perf_counter()
                self._release(row)

    # -- decoding ----------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, StreamEvent]]:
        """Run a chunk of the prompts being prefilled (paged), dispatch the next decode step (if
        any row needs it), then return the events of the step dispatched before it and of rows
        whose prefill completed."""
        if runtime.code_added():  # a new bucket: keep compiled code under the kernel's mapping limit
            jax.block_until_ready([tokens for tokens, _ in self.inflight])  # nothing runs code being unmapped
            runtime.release_compiled_code()
        first_events = self._prefill_step(len(self._needing())) if self.paged and self.prefilling else []
        dispatched = self._dispatch()
        events = self._read(self.inflight.pop(0)) if self.inflight else []
        if dispatched is not None:
            self.inflight.append(dispatched)
        if (
            self.paged
            and not self.busy
            and (self.cache.n_blocks > self.min_blocks or (self.lazy_pool and self.pool_written))
        ):
            self._reset_pool()  # idle: give the grown (or committed) pool's memory back
        return first_events + events

    def _needing(self) -> list[_Row]:
        """Rows that need another decode step (prompt all in the cache, tokens still to come)."""
        return [
            r
            for r in self.rows
            if r is not None
            and not r.finished
            and r.prefilled == len(r.request.prompt)
            and 1 + r.dispatched < r.request.sampling.max_new_tokens
        ]

    def _dispatch(self) -> tuple[jax.Array, list[_Row | None]] | None:
        engine = self.engine
        needing = self._needing()
        if not needing:
            return None
        rows = min(self.n_slots, max(batch_bucket(max(r.slot for r in needing) + 1), engine.min_decode_batch))
        attend_len = kv_bucket(max(r.next_position for r in needing) + 1)
        wanted = SamplerMode.for_batch([r.request.sampling for r in self.rows if r is not None])
        # Never downgrade the sampler while rows run: a batch keeps one compiled variant.
        self.mode = max(self.mode, wanted, key=_MODE_ORDER.index)
        whole = rows == self.n_slots
        state = self.state if whole else jax.tree.map(lambda a: a[:rows], self.state)
        sampler = self.sampler if whole else jax.tree.map(lambda a: a[:rows], self.sampler)
        lora = self._step_adapters([r.bank_slot for r in self.rows[:rows] if r is not None], self.row_bank_slots[:rows])
        counts = self.counts if whole or self.counts is None else self.counts[:rows]
        # Only the rows that decode take part: the others' lines are no line (their writes drop).
        snapshot = [r if r in needing else None for r in self.rows[:rows]]
        tables = None
        if self.paged:
            for r in needing:
                self._back(r, r.next_position + 1)
            tables = self._tables(snapshot, attend_len)
        self.cache, out, counts = _decode_step(
            engine.params,
            self.cache,
            state,
            sampler,
            lora,
            counts,
            tables,
            config=engine.config,
            attend_len=attend_len,
            mode=self.mode,
            activation_dtype=engine.activation_dtype,
            cache_sharding=self.cache_sharding,
        )
        if whole:
            self.state = out
        else:
            self.state = jax.tree.map(lambda new, old: jnp.concatenate([new, old[rows:]]), out, self.state)
        if counts is not None:
            self.counts = counts if whole else jnp.concatenate([counts, self.counts[rows:]])
        for r in needing:
            r.dispatched += 1
        return out.tokens, snapshot

    def _read(self, inflight: tuple[jax.Array, list[_Row | None]]) -> list[tuple[Request, StreamEvent]]:
        tokens, snapshot = inflight
        host = np.asarray(tokens)
        events = []
        for slot, row in enumerate(snapshot):
            if row is not None and not row.finished:
                events.extend(self._emit(row, int(host[slot])))
        if not self.active_rows:
            self.mode = SamplerMode.GREEDY
        return events

    def _emit(self, row: _Row, token: int) -> list[tuple[Request, StreamEvent]]:
        """Per-row host work for one token: stop checks, detokenizing, the event."""
        row.count += 1
        sampling = row.request.sampling
        finish = None
        if token in self.engine.eos_ids:
            text, finish = row.text.flush(), "stop"
        else:
            text, stopped = row.text.add(token)
            if stopped:
                finish = "stop"
            elif row.count >= sampling.max_new_tokens:
                text, finish = text + row.text.flush(), "length"
        if finish:
            row.finished = True
            row.finish_time = time.perf_counter()
            self._release(row)
        return [(row.request, StreamEvent(row.request.index, token, text, finish))]

    def timings(self, row: _Row) -> dict[str, float]:
        decode_s = row.finish_time - row.first_token_time
        return {
            "ttft_s": row.first_token_time - row.start_time,
            "total_s": row.finish_time - row.start_time,
            "decode_s": decode_s,
            "decode_tok_s": (row.count - 1) / decode_s if decode_s > 0 and row.count > 1 else 0.0,
        }


class Engine:
    """Batched, streamed generation over one model's weights.

    With a ``mesh`` (a ``Mesh`` or a spec string such as ``"tensor=2"``), the weights are split
    over its devices by the trainer's rule table and every KV cache by rows (``data``) and KV
    heads (``tensor``): see ``afmkit.sharding.inference``.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Params,
        tokenizer: Any,
        *,
        eos_ids: Sequence[int] = (),
        max_batch: int = MAX_BATCH,
        mesh: Mesh | str | None = None,
        kv: KVSettings | None = None,
    ) -> None:
        self.config = config
        self.kv = kv or KVSettings()
        self.kv.check()
        self.mesh = None if mesh is None else mesh_inference.as_mesh(mesh)
        if self.mesh is not None:
            params = mesh_inference.shard_weights(config, params, self.mesh)
        self.params = params
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_batch = max_batch
        self.activation_dtype = activation_dtype(params)
        # XLA:CPU has no fast single-row (matrix-vector) path for bf16 weights: decode at least
        # two rows there; a second row costs next to nothing when decode is bandwidth-bound.
        on_cpu = jax.default_backend() == "cpu"
        self.min_decode_batch = 2 if on_cpu and params["embed"].dtype == jnp.bfloat16 else 1
        # Every cache's rows split evenly over the mesh's batch axes.
        self.row_multiple = mesh_inference.row_multiple(self.mesh)

    def kv_cache_sharding(self, *, rows: int) -> NamedSharding | None:
        """The layout of a ``rows``-row KV cache on the mesh (None without one)."""
        if self.mesh is None:
            return None
        return mesh_inference.kv_cache_sharding(self.config, self.mesh, rows=rows)

    def paged_kv_sharding(self) -> tuple[tuple[int, NamedSharding], ...] | None:
        """The layouts of a paged pool's arrays on the mesh, by rank (None without one)."""
        if self.mesh is None:
            return None
        return mesh_inference.paged_kv_sharding(self.config, self.mesh)

    # -- public API --------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams],
        *,
        adapters: LoraAdapter | Sequence[LoraAdapter | None] | None = None,
    ) -> list[Completion]:
        """Generate for every prompt (token ids); returns one ``Completion`` per prompt.

        ``adapters``: one LoRA adapter for every prompt, or one (or None) per prompt.
        """
        params_list = self._per_prompt(prompts, sampling)
        tokens: list[list[int]] = [[] for _ in prompts]
        texts: list[list[str]] = [[] for _ in prompts]
        finish: list[str] = ["length"] * len(prompts)
        timings: list[dict[str, float]] = [{} for _ in prompts]
        for event in self.stream(prompts, params_list, timings_out=timings, adapters=adapters):
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
        adapters: LoraAdapter | Sequence[LoraAdapter | None] | None = None,
        stop_when: StopCheck | None = None,
        max_batch: int | None = None,
    ) -> Iterator[StreamEvent]:
        """Yield ``StreamEvent``s as tokens come. Up to ``max_batch`` prompts (default: the
        engine's) decode together and
        a finished row's slot goes to the next prompt at once (continuous batching), so one long
        answer never holds a whole batch of finished ones back.

        ``stop_when(index, tokens)`` is asked every ``STOP_CHECK_EVERY`` tokens of a row; a
        string it returns ends the row there, with that string as its ``finish_reason`` (rollouts
        cut repetition loops this way instead of decoding them to ``max_new_tokens``).
        """
        params_list = self._per_prompt(prompts, sampling)
        adapter_list = self._per_prompt_adapters(prompts, adapters)
        for i, prompt in enumerate(prompts):
            self._check_prompt(i, prompt, params_list[i])
        if not prompts:
            return
        n = len(prompts)
        width = min(n, max_batch or self.max_batch)
        rows_total = _round_up(max(batch_bucket(width), self.min_decode_batch), self.row_multiple)
        capacity = cache_capacity(max(len(p) for p in prompts), max(s.max_new_tokens for s in params_list))
        distinct = list({id(a): a for a in adapter_list if a is not None}.values())
        batch = DecodeBatch(self, slots=rows_total, capacity=capacity, adapters=distinct)
        requests = [
            Request(list(p), s, a, index=i) for i, (p, s, a) in enumerate(zip(prompts, params_list, adapter_list))
        ]
        waiting = list(requests)  # in order: admitted as slots free up
        generated: list[list[int]] = [[] for _ in prompts] if stop_when is not None else []
        while waiting or batch.busy:
            events: list[tuple[Request, StreamEvent]] = []
            if waiting and batch.free_slots:
                admitted, events = batch.admit(waiting[: batch.free_slots])
                if not admitted and not batch.busy:
                    raise RuntimeError("an empty batch admits a request it accepted")  # check() refuses the rest
                taken = {id(r) for r in admitted}
                waiting = [r for r in waiting if id(r) not in taken]
            events += batch.step()
            for request, event in events:
                if stop_when is not None and event.finish_reason is None:
                    row_tokens = generated[event.index]
                    row_tokens.append(event.token)
                    if len(row_tokens) % STOP_CHECK_EVERY == 0:
                        reason = stop_when(event.index, row_tokens)
                        if reason:
                            event.text += request.row.text.flush()
                            event.finish_reason = reason
                            batch.cancel(request)
                yield event
        if timings_out is not None:
            for i, request in enumerate(requests):
                timings_out[i].update(batch.timings(request.row))

    def new_batch(
        self, *, slots: int, capacity: int, adapter_slots: int = 0, kv: KVSettings | None = None
    ) -> DecodeBatch:
        """An empty running batch for continuous batching (the server's scheduler); ``kv``: its
        cache's settings (default: the engine's)."""
        return DecodeBatch(self, slots=slots, capacity=capacity, adapter_slots=adapter_slots, kv=kv)

    # -- internals ---------------------------------------------------------------------------
    def _per_prompt(self, prompts: Sequence[Sequence[int]], sampling: Any) -> list[SamplingParams]:
        if isinstance(sampling, SamplingParams):
            return [sampling] * len(prompts)
        sampling = list(sampling)
        if len(sampling) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts but {len(sampling)} sampling parameter sets")
        return sampling

    def _per_prompt_adapters(self, prompts: Sequence[Sequence[int]], adapters: Any) -> list[LoraAdapter | None]:
        if adapters is None or isinstance(adapters, LoraAdapter):
            return [adapters] * len(prompts)
        adapters = list(adapters)
        if len(adapters) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts but {len(adapters)} adapters")
        return adapters

    def _check_prompt(self, index: int, prompt: Sequence[int], sampling: SamplingParams) -> None:
        if len(prompt) == 0:
            raise UserError(f"prompt {index} is empty; give at least one token")
        room = self.config.max_seq_len - len(prompt)  # positions left for generated tokens
        self.config.check_context(
            len(prompt) + sampling.max_new_tokens,
            what=f"prompt {index} ({len(prompt)} tokens) plus max_new_tokens ({sampling.max_new_tokens})",
            fix=f"lower max_new_tokens to at most {room} or shorten the prompt" if room > 0 else "shorten the prompt",
        )
        bad = [t for t in prompt if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise UserError(
                f"prompt {index} has token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}"
            )
