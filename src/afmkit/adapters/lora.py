"""LoRA adapters: low-rank updates ``W + (alpha / r) * A @ B`` to chosen linears of chosen layers.

An adapter is a separate pytree, never mixed into the base weights: for every targeted weight of
a layer, ``A`` has the weight's input axes plus the rank (``wq`` is ``[d, h, hd]`` so its ``A`` is
``[d, r]``; ``wo`` is ``[h, hd, d]`` so its ``A`` is ``[h, hd, r]``) and ``B`` the rank plus the
weight's output axes. Weights are stored in 16 bits (fp16 or bf16) and applied in the
activations' precision.

Three ways to apply adapters, all through the one ``forward``:

* ``single(adapter)``: one adapter on every row (training, scoring).
* ``AdapterBank`` + ``bank.rows(ids)``: a bank of adapters stacked ``[n, ...]`` with slot 0 all
  zeros ("no adapter"); each row of a batch gathers its own slot's ``A`` and ``B`` (as S-LoRA and
  Punica do), so one decode batch serves many adapters and the bare base at once.
* ``merge(params, adapter)``: fold the update into the base weights (zero overhead for a single
  adapter); ``unmerge`` subtracts it again.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.model.packed import PackedWeight
from afmkit.model.palettized import PalettizedWeight
from afmkit.model.transformer import Params, weight_specs

# Short target names (as in the PEFT and Apple write-ups) -> afmkit's per-layer weight names.
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
# How many leading axes of each weight are inputs (contracted with the activations).
INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
STORAGE_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which linears of which layers an adapter updates, and its rank and scale."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = tuple(TARGETS)
    layers: tuple[int, ...] | None = None  # None: every layer
    dtype: str = "float16"  # storage precision of A and B

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha must be positive, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UserError(f"unknown LoRA targets {unknown}; choose from {', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
        if self.dtype not in STORAGE_DTYPES:
            raise UserError(f"LoRA storage dtype {self.dtype!r} unknown; use one of {', '.join(STORAGE_DTYPES)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_ids(self, config: ModelConfig) -> tuple[int, ...]:
        layers = tuple(range(config.n_layers)) if self.layers is None else self.layers
        bad = [i for i in layers if not 0 <= i < config.n_layers]
        if bad:
            raise UserError(f"LoRA layers {bad} do not exist; the model has layers 0..{config.n_layers - 1}")
        return layers


@dataclasses.dataclass
class LoraAdapter:
    """An adapter's config and weights: ``weights[i]`` maps weight names (``"wq"``...) of layer
    ``i`` to ``{"a", "b"}`` (an empty dict for layers it leaves alone)."""

    config: LoraConfig
    weights: list[dict[str, dict[str, Any]]]
    name: str = ""

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.weights))

    def astype(self, dtype: Any) -> LoraAdapter:
        return dataclasses.replace(self, weights=jax.tree.map(lambda x: jnp.asarray(x, dtype), self.weights))


def lora_shape_table(config: ModelConfig, rank: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Shapes of ``A`` and ``B`` for every adaptable weight of ``config``. Loops over an
    adapter's tensors take this once (nothing is memoized: adapters are cached in one place,
    ``AdapterRegistry``)."""
    layer = weight_specs(config)["layers"][0]
    return {
        name: ((*layer[name].shape[:n_in], rank), (rank, *layer[name].shape[n_in:]))
        for name, n_in in INPUT_AXES.items()
    }


def lora_shapes(config: ModelConfig, weight: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``A`` and ``B`` for one weight of ``config``."""
    return lora_shape_table(config, rank)[weight]


def init_adapter(config: ModelConfig, lora: LoraConfig, key: jax.Array, *, name: str = "") -> LoraAdapter:
    """A fresh adapter that changes nothing yet: ``A`` random (std 1/sqrt(fan-in)), ``B`` zeros."""
    layer_ids = set(lora.layer_ids(config))
    dtype = STORAGE_DTYPES[lora.dtype]
    weights: list[dict[str, dict[str, Any]]] = []
    for i in range(config.n_layers):
        layer: dict[str, dict[str, Any]] = {}
        if i in layer_ids:
            for target in lora.targets:
                weight = TARGETS[target]
                a_shape, b_shape = lora_shapes(config, weight, lora.rank)
                key, sub = jax.random.split(key)
                fan_in = int(np.prod(a_shape[:-1]))
                a = jax.random.normal(sub, a_shape) / np.sqrt(fan_in)
                layer[weight] = {"a": a.astype(dtype), "b": jnp.zeros(b_shape, dtype)}
        weights.append(layer)
    return LoraAdapter(config=lora, weights=weights, name=name)


def check_adapter(config: ModelConfig, adapter: LoraAdapter) -> None:
    """Refuse an adapter whose shapes do not fit ``config`` (a clear error, not a shape crash)."""
    if len(adapter.weights) != config.n_layers:
        raise UserError(
            f"adapter {adapter.name!r} has {len(adapter.weights)} layers but the model has {config.n_layers}; "
            "it was made for another base model"
        )
    shapes = lora_shape_table(config, adapter.config.rank)
    for i, layer in enumerate(adapter.weights):
        for weight, ab in layer.items():
            if weight not in INPUT_AXES:
                raise UserError(f"adapter {adapter.name!r}: layer {i} has unknown weight {weight!r}")
            want_a, want_b = shapes[weight]
            if tuple(ab["a"].shape) != want_a or tuple(ab["b"].shape) != want_b:
                raise UserError(
                    f"adapter {adapter.name!r}: layer {i} {weight} has A {tuple(ab['a'].shape)} and B "
                    f"{tuple(ab['b'].shape)}, but this base model needs {want_a} and {want_b}; "
                    "it was made for another base model"
                )


# -- the two einsums of a LoRA update, derived from the base matmul's spec ---------------------
def _lora_specs(spec: str, *, per_row: bool) -> tuple[str, str]:
    """``x @ A`` and ``(x @ A) @ B`` einsum specs for a base spec like ``"btd,dhk->bthk"``."""
    inputs, out = spec.split("->")
    lhs, w = inputs.split(",")
    rank = next(c for c in string.ascii_lowercase if c not in spec)
    w_in = "".join(c for c in w if c in lhs)
    w_out = "".join(c for c in w if c not in lhs)
    mid = "".join(c for c in lhs if c not in w_in) + rank
    row = lhs[0] if per_row else ""  # the batch axis: each row has its own A and B
    return f"{lhs},{row}{w_in}{rank}->{mid}", f"{mid},{row}{rank}{w_out}->{out}"


@dataclasses.dataclass(frozen=True)
class _Update:
    """The LoRA update of one weight; ``linear`` calls it with its spec and input."""

    a: jax.Array
    b: jax.Array
    scale: float | None  # None: applied by the caller
    per_row: bool

    def __call__(self, spec: str, x: jax.Array) -> jax.Array:
        if not self.per_row:
            # As two 2-D matmuls over the flattened tokens: XLA:CPU's gradients of the einsums
            # (contracting over batch and sequence together) took 4x longer (1,024 tokens).
            n_in = self.a.ndim - 1
            x2 = x.reshape(-1, math.prod(x.shape[x.ndim - n_in :]))
            low = x2 @ self.a.astype(x.dtype).reshape(x2.shape[1], -1)
            out = (low @ self.b.astype(x.dtype).reshape(low.shape[1], -1)).reshape(
                *x.shape[: x.ndim - n_in], *self.b.shape[1:]
            )
        else:
            first, second = _lora_specs(spec, per_row=self.per_row)
            low = jnp.einsum(first, x, self.a.astype(x.dtype))
            out = jnp.einsum(second, low, self.b.astype(x.dtype))
        return out if self.scale is None else out * self.scale


@dataclasses.dataclass(frozen=True)
class _LayerUpdates:
    updates: dict[str, _Update]

    def get(self, weight: str) -> _Update | None:
        return self.updates.get(weight)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SingleAdapter:
    """One adapter applied to every row: what ``forward(..., adapters=...)`` takes for training."""

    weights: list[dict[str, dict[str, jax.Array]]]
    scale: float = dataclasses.field(metadata={"static": True})

    def only_layer(self, i: int) -> SingleAdapter:
        """Layer ``i``'s weights alone, as layer 0 (what one layer's computation takes as input)."""
        return dataclasses.replace(self, weights=[self.weights[i]])

    def layer(self, i: int) -> _LayerUpdates | None:
        layer = self.weights[i]
        if not layer:
            return None
        return _LayerUpdates({w: _Update(ab["a"], ab["b"], self.scale, False) for w, ab in layer.items()})


def single(adapter: LoraAdapter) -> SingleAdapter:
    return SingleAdapter(weights=adapter.weights, scale=adapter.config.scale)


@dataclasses.dataclass(frozen=True)
class _BankUpdate:
    """The per-row LoRA update of one weight from a bank ``[n_slots, ...]``.

    Each row's update comes from its own slot only, by selection (a gather), never by multiplying
    other slots with a zero mask: ``0 * NaN`` is NaN, so one damaged slot would otherwise spread
    to every row of the batch. Two equivalent schedules, chosen per call from static shapes:

    * gather: each row gathers its slot's ``A`` and ``B`` (``[B, ...]``), then two batched
      einsums. Reads ``B`` copies of an adapter; LoRA FLOPs are those of one adapter per row.
      Best for prefill (many tokens per row: compute-bound).
    * all slots: every row's input times every slot's ``A`` (``[B, n_slots, r]``, reading ``A``
      once), each row gathers its own slot's result; that times every slot's ``B``, and each row
      gathers its own slot's output. Best for decode (one token per row, memory-bound) when the
      bank has fewer slots than the batch rows: the bank is read once per step instead of once per
      row (gathering ``B`` per row copied it ``B`` times, most of a LoRA decode step's time).
    """

    a: jax.Array  # [n_slots, in..., r]
    b: jax.Array  # [n_slots, r, out...]
    scales: jax.Array  # [n_slots] float32
    row_slots: jax.Array  # [B] int32

    def __call__(self, spec: str, x: jax.Array) -> jax.Array:
        batch, tokens_per_row = x.shape[0], int(np.prod(x.shape[1:-1], dtype=np.int64))
        n_slots = self.a.shape[0]
        rows = self.row_slots
        if tokens_per_row == 1 and n_slots < batch:
            every_slot = jnp.einsum(_bank_spec(spec), x, self.a.astype(x.dtype))  # [B, 1..., n_slots, r]
            low = every_slot.reshape(batch, n_slots, -1)[jnp.arange(batch), rows]  # the row's own slot
            low = low.reshape(*every_slot.shape[:-2], low.shape[-1])
            every_out = jnp.einsum(_every_slot_out_spec(spec), low, self.b.astype(x.dtype))  # [B, n_slots, ...]
            out = every_out[jnp.arange(batch), rows]
        else:
            out = _Update(self.a[rows], self.b[rows], None, True)(spec, x)
        return out * self.scales[rows].astype(x.dtype).reshape((batch,) + (1,) * (out.ndim - 1))


def _bank_spec(spec: str) -> str:
    """``x`` times every slot's ``A`` for a base spec like ``"btd,dhk->bthk"``: ``"btd,sdr->btsr"``."""
    inputs, _ = spec.split("->")
    lhs, w = inputs.split(",")
    rank, slot = [c for c in string.ascii_lowercase if c not in spec][:2]
    w_in = "".join(c for c in w if c in lhs)
    mid = "".join(c for c in lhs if c not in w_in) + slot + rank
    return f"{lhs},{slot}{w_in}{rank}->{mid}"


def _every_slot_out_spec(spec: str) -> str:
    """``low`` (a row's rank-r input) times every slot's ``B``, slots after the batch axis: for a
    base spec like ``"btd,dhk->bthk"``, ``"btr,srhk->bsthk"``."""
    second = _lora_specs(spec, per_row=False)[1]
    low, rest = second.split(",")
    b_axes, out = rest.split("->")
    slot = next(c for c in string.ascii_lowercase if c not in second)
    return f"{low},{slot}{b_axes}->{out[0]}{slot}{out[1:]}"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowAdapters:
    """A bank's arrays plus each row's slot (0 = no adapter): per-row LoRA for mixed batches."""

    weights: list[dict[str, dict[str, jax.Array]]]  # [n_slots, ...] per weight
    scales: jax.Array  # [n_slots] float32: each slot's alpha/r (0 for slot 0)
    row_slots: jax.Array  # [B] int32

    def only_layer(self, i: int) -> RowAdapters:
        """Layer ``i``'s weights alone, as layer 0 (what one layer's computation takes as input)."""
        return dataclasses.replace(self, weights=[self.weights[i]])

    def layer(self, i: int) -> _LayerUpdates | None:
        layer = self.weights[i]
        if not layer:
            return None
        return _LayerUpdates({w: _BankUpdate(ab["a"], ab["b"], self.scales, self.row_slots) for w, ab in layer.items()})


def _put_slot(weights: Any, slot: jax.Array, update: Any) -> Any:
    return jax.tree.map(lambda bank, new: bank.at[slot].set(new.astype(bank.dtype)), weights, update)


_put_slot_jit = jax.jit(_put_slot, donate_argnums=0)


class AdapterBank:
    """A fixed number of adapter slots stacked on the device, slot 0 kept all zeros.

    Every slot has the same layout: the union of (layer, weight) pairs and the largest rank of
    the adapters it was made for (smaller adapters are zero-padded, which changes nothing). Its
    shapes never change, so swapping adapters in and out never recompiles a step.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        slots: int,
        layout: dict[int, tuple[str, ...]],
        rank: int,
        dtype: Any = jnp.float16,
    ) -> None:
        if slots < 2:
            raise UserError("an adapter bank needs at least 2 slots (slot 0 is 'no adapter')")
        self.config, self.slots, self.rank, self.dtype = config, slots, rank, dtype
        self.layout = {i: tuple(ws) for i, ws in layout.items() if ws}
        self.weights: list[dict[str, dict[str, jax.Array]]] = []
        for i in range(config.n_layers):
            layer = {}
            for weight in self.layout.get(i, ()):
                a_shape, b_shape = lora_shapes(config, weight, rank)
                layer[weight] = {"a": jnp.zeros((slots, *a_shape), dtype), "b": jnp.zeros((slots, *b_shape), dtype)}
            self.weights.append(layer)
        # Each slot's alpha/r, applied in fp32 (folding it into 16-bit B would round it).
        self.scales = np.zeros((slots,), np.float32)

    @classmethod
    def for_adapters(
        cls, config: ModelConfig, adapters: Sequence[LoraAdapter], *, slots: int | None = None, dtype: Any = None
    ) -> AdapterBank:
        """A bank whose layout fits every adapter given, with them in slots 1..n."""
        layout = union_layout(adapters)
        rank = max((a.config.rank for a in adapters), default=1)
        if dtype is None:
            dtype = STORAGE_DTYPES[adapters[0].config.dtype] if adapters else jnp.float16
        bank = cls(config, slots=slots or len(adapters) + 1, layout=layout, rank=rank, dtype=dtype)
        for slot, adapter in enumerate(adapters, start=1):
            bank.put(slot, adapter)
        return bank

    def fits(self, adapter: LoraAdapter) -> bool:
        if adapter.config.rank > self.rank:
            return False
        return all(set(layer) <= set(self.layout.get(i, ())) for i, layer in enumerate(adapter.weights))

    def grown_for(self, adapter: LoraAdapter) -> AdapterBank:
        """A bank laid out for ``adapter`` too (the union of layouts, the larger rank) holding
        every slot of this one, zero-padded, in the same slot: rows using those slots keep
        running, and rows of ranks or layouts the bank had not seen join the same batch."""
        layout = union_layout([adapter])
        for i, weights in self.layout.items():
            layout[i] = tuple(w for w in INPUT_AXES if w in set(weights) | set(layout.get(i, ())))
        grown = AdapterBank(
            self.config, slots=self.slots, layout=layout, rank=max(self.rank, adapter.config.rank), dtype=self.dtype
        )
        r = self.rank
        for old, new in zip(self.weights, grown.weights):
            for weight, ab in old.items():
                new[weight] = {
                    "a": new[weight]["a"].at[..., :r].set(ab["a"]),  # A: rank is the last axis
                    "b": new[weight]["b"].at[:, :r].set(ab["b"]),  # B: rank follows the slot axis
                }
        grown.scales = self.scales.copy()
        return grown

    def put(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Write ``adapter`` (None: zeros) into ``slot``, in place on the device."""
        if not 1 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside 1..{self.slots - 1}")
        if adapter is not None and not self.fits(adapter):
            raise UserError(f"adapter {adapter.name!r} does not fit this bank's layout (rank {self.rank})")
        dtype = np.dtype(self.dtype)
        update = []
        for i, layer in enumerate(self.weights):
            update.append({})
            for weight, ab in layer.items():
                src = adapter.weights[i].get(weight) if adapter is not None else None
                if src is not None and adapter.config.rank == self.rank:
                    a, b = np.asarray(src["a"], dtype), np.asarray(src["b"], dtype)
                else:  # absent (zeros) or a smaller rank (zero-padded: adds nothing)
                    a, b = np.zeros(ab["a"].shape[1:], dtype), np.zeros(ab["b"].shape[1:], dtype)
                    if src is not None:
                        r = adapter.config.rank
                        a[..., :r], b[:r] = np.asarray(src["a"], dtype), np.asarray(src["b"], dtype)
                update[i][weight] = {"a": a, "b": b}
        self.weights = _put_slot_jit(self.weights, jnp.int32(slot), update)
        self.scales[slot] = 0.0 if adapter is None else adapter.config.scale

    def rows(self, row_slots: Any) -> RowAdapters:
        return RowAdapters(
            weights=self.weights, scales=jnp.asarray(self.scales), row_slots=jnp.asarray(row_slots, jnp.int32)
        )


def union_layout(adapters: Sequence[LoraAdapter]) -> dict[int, tuple[str, ...]]:
    layout: dict[int, set[str]] = {}
    for adapter in adapters:
        for i, layer in enumerate(adapter.weights):
            layout.setdefault(i, set()).update(layer)
    return {i: tuple(w for w in INPUT_AXES if w in ws) for i, ws in layout.items() if ws}


# -- merging --------------------------------------------------------------------------------
def _delta(weight: str, ab: dict[str, Any], scale: float, dtype: Any) -> jax.Array:
    a, b = jnp.asarray(ab["a"], jnp.float32), jnp.asarray(ab["b"], jnp.float32)
    n_in = INPUT_AXES[weight]
    letters = string.ascii_lowercase
    w_in, w_out = letters[: a.ndim - 1], letters[n_in : n_in + b.ndim - 1]
    return (scale * jnp.einsum(f"{w_in}z,z{w_out}->{w_in}{w_out}", a, b)).astype(dtype)


def merge(params: Params, adapter: LoraAdapter) -> Params:
    """Base weights with the adapter folded in: ``W + scale * A @ B`` (a new pytree; the base
    weights are not modified)."""
    return _apply(params, adapter, sign=1.0)


def unmerge(params: Params, adapter: LoraAdapter) -> Params:
    """Undo ``merge``: ``W - scale * A @ B``."""
    return _apply(params, adapter, sign=-1.0)


def _apply(params: Params, adapter: LoraAdapter, *, sign: float) -> Params:
    layers = []
    for layer, updates in zip(params["layers"], adapter.weights):
        layer = dict(layer)
        for weight, ab in updates.items():
            w = layer[weight]
            if isinstance(w, (PackedWeight, PalettizedWeight)):
                raise UserError(
                    "cannot merge an adapter into packed (int4/int8) or palettized weights; load the model in "
                    "float32 or bfloat16 to merge, or serve the adapter unmerged"
                )
            # Accumulate in fp32 so bf16 weights lose no more than one rounding.
            layer[weight] = (
                w.astype(jnp.float32) + _delta(weight, ab, sign * adapter.config.scale, jnp.float32)
            ).astype(w.dtype)
        layers.append(layer)
    return {**params, "layers": layers}


def mix(adapters: Sequence[LoraAdapter], weights: Sequence[float], *, name: str = "") -> LoraAdapter:
    """One adapter whose update is ``sum_k weights[k] * update_k`` exactly (weight-space ensembling,
    as WiSE-FT interpolates a fine-tuned model with its start). The adapters' ranks are stacked:
    ``A = [A_1 | A_2 | ...]`` and ``B = [w_1 s_1 B_1; w_2 s_2 B_2; ...]`` with each adapter's own
    scale ``s_k`` folded into its block, so the result has rank ``sum r_k`` and scale 1."""
    if len(adapters) < 2 or len(weights) != len(adapters):
        raise UserError(
            f"mixing needs two or more adapters and one weight each; got {len(adapters)} adapters, {len(weights)} weights"
        )
    layouts = {tuple(frozenset(layer) for layer in adapter.weights) for adapter in adapters}
    if len(layouts) != 1:
        raise UserError(
            "the adapters update different layers or weights; mix adapters with the same targets and layers"
        )
    first = adapters[0]
    dtype = STORAGE_DTYPES[first.config.dtype]
    layers = [
        {
            weight: {
                "a": np.concatenate([np.asarray(x.weights[i][weight]["a"], np.float32) for x in adapters], axis=-1),
                "b": np.concatenate(
                    [
                        float(w) * x.config.scale * np.asarray(x.weights[i][weight]["b"], np.float64)
                        for x, w in zip(adapters, weights)
                    ],
                    axis=0,
                ),
            }
            for weight in layer
        }
        for i, layer in enumerate(first.weights)
    ]
    layers = [{weight: {k: v.astype(dtype) for k, v in ab.items()} for weight, ab in layer.items()} for layer in layers]
    rank = sum(x.config.rank for x in adapters)
    config = dataclasses.replace(first.config, rank=rank, alpha=float(rank))
    return LoraAdapter(config=config, weights=layers, name=name)


def random_adapter(
    config: ModelConfig, lora: LoraConfig, key: jax.Array, *, b_std: float = 0.005, name: str = ""
) -> LoraAdapter:
    """An adapter with random ``A`` and ``B`` (a fresh one has ``B = 0`` and changes nothing):
    stands in for a trained adapter in tests and benchmarks."""
    a_key, b_key = jax.random.split(key)
    adapter = init_adapter(config, lora, a_key, name=name)
    for layer in adapter.weights:
        for ab in layer.values():
            b_key, sub = jax.random.split(b_key)
            ab["b"] = (b_std * jax.random.normal(sub, ab["b"].shape)).astype(ab["b"].dtype)
    return adapter
