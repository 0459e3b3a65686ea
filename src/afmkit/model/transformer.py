"""The AFM decoder-only transformer as plain functions over a pytree of weights.

Pre-norm RMSNorm, grouped-query attention with RoPE and optional q/k RMSNorm, SwiGLU, no
biases, one embedding shared by input and output. ``forward`` is pure: it takes the weights, the
tokens, their positions and a KV cache, and returns hidden states and the updated cache.

Weights are a dict ``{"embed", "layers": [per-layer dict, ...], "final_norm"[, "lm_head"]}``.
Layers are a list rather than one stacked array so that inference reads each weight in place
(a slice of a stacked array is a copy on XLA:CPU, which would double decode memory traffic).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit import kernels
from afmkit.config import ModelConfig
from afmkit.model.kv_cache import KVCache, PagedKVCache, PagedLayer
from afmkit.model.packed import PackedWeight, packed_linear
from afmkit.model.palettized import PalettizedWeight, palettized_linear
from afmkit.sharding.activations import constrain, ways_split

Params = dict[str, Any]

# Queries per block in the attention of packed rows whose length is a multiple of it: a block
# skips the keys after its own, so a 1,024-position row computes 36 of 64 blocks of scores.
CAUSAL_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Shape, logical axis names and initial scale of one weight (std 0 means ones)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init_std: float


def weight_specs(config: ModelConfig) -> Params:
    """The pytree of every weight's ``WeightSpec``; the single source of shapes and axes."""
    d, hd, h, kv, f = config.d_model, config.head_dim, config.n_heads, config.n_kv_heads, config.d_ff
    std = 1.0 / math.sqrt(d)
    out_std = std / math.sqrt(2 * config.n_layers)  # residual branches scaled by depth
    layer = {
        "attn_norm": WeightSpec((d,), ("embed",), 0.0),
        "wq": WeightSpec((d, h, hd), ("embed", "heads", "head_dim"), std),
        "wk": WeightSpec((d, kv, hd), ("embed", "kv_heads", "head_dim"), std),
        "wv": WeightSpec((d, kv, hd), ("embed", "kv_heads", "head_dim"), std),
        "wo": WeightSpec((h, hd, d), ("heads", "head_dim", "embed"), out_std),
        "mlp_norm": WeightSpec((d,), ("embed",), 0.0),
        "w_gate": WeightSpec((d, f), ("embed", "mlp"), std),
        "w_up": WeightSpec((d, f), ("embed", "mlp"), std),
        "w_down": WeightSpec((f, d), ("mlp", "embed"), out_std),
    }
    if config.qk_norm:
        layer["q_norm"] = WeightSpec((hd,), ("head_dim",), 0.0)
        layer["k_norm"] = WeightSpec((hd,), ("head_dim",), 0.0)
    specs: Params = {
        # std 1/sqrt(d): the tied table is also the output projection, so logits start near 0
        "embed": WeightSpec((config.vocab_size, d), ("vocab", "embed"), std),
        "layers": [dict(layer) for _ in range(config.n_layers)],
        "final_norm": WeightSpec((d,), ("embed",), 0.0),
    }
    if not config.tie_embeddings:
        specs["lm_head"] = WeightSpec((d, config.vocab_size), ("embed", "vocab"), std)
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, WeightSpec)


def logical_axes(config: ModelConfig) -> Params:
    """The logical axis names of every weight, as a pytree shaped like the weights."""
    return jax.tree.map(lambda s: s.axes, weight_specs(config), is_leaf=_is_spec)


def abstract_params(config: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """Shapes and dtypes of the weights without allocating them."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), weight_specs(config), is_leaf=_is_spec)


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random weights: normal(0, std) for matrices, ones for norm scales."""
    specs, treedef = jax.tree.flatten(weight_specs(config), is_leaf=_is_spec)
    keys = jax.random.split(key, len(specs))
    leaves = [
        jnp.ones(s.shape, dtype) if s.init_std == 0 else (s.init_std * jax.random.normal(k, s.shape)).astype(dtype)
        for s, k in zip(specs, keys)
    ]
    return jax.tree.unflatten(treedef, leaves)


def linear(spec: str, x: jax.Array, w: jax.Array, *, lora: Any = None) -> jax.Array:
    """``x`` times a weight. The matmul runs in the weight's precision (bf16 weights: bf16
    inputs, fp32 accumulation); the result comes back in ``x``'s dtype. ``lora``: an optional
    low-rank update, called as ``lora(spec, x)`` (see ``afmkit.adapters.lora``). A packed 4/8-bit
    weight (``afmkit.model.packed``) or a palettized one (``afmkit.model.palettized``) contracts
    ``x``'s trailing axes with its input axes."""
    if isinstance(w, PackedWeight):
        y = packed_linear(x, w).astype(x.dtype)
    elif isinstance(w, PalettizedWeight):
        y = palettized_linear(x, w).astype(x.dtype)
    else:
        y = jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(x.dtype)
    return y if lora is None else y + lora(spec, x).astype(x.dtype)


def _lora(lora: Any, weight: str) -> Any:
    """The update of one weight from a layer's adapters (None when the layer has none)."""
    return None if lora is None else lora.get(weight)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding on ``x[..., T, heads, head_dim]`` (half-split layout, as Hugging Face)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (np.arange(half, dtype=np.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def _rope_and_qk_norm(
    layer: Params, q: jax.Array, k: jax.Array, positions: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """RoPE on queries and keys, with q/k RMSNorm before or after it (``config.qk_norm_position``)."""
    if config.qk_norm and config.qk_norm_position == "before_rope":
        q = rms_norm(q, layer["q_norm"], config.norm_eps)
        k = rms_norm(k, layer["k_norm"], config.norm_eps)
    q, k = rope(q, positions, config.rope_base), rope(k, positions, config.rope_base)
    if config.qk_norm and config.qk_norm_position == "after_rope":  # AXLearn's order (AFM)
        q = rms_norm(q, layer["q_norm"], config.norm_eps)
        k = rms_norm(k, layer["k_norm"], config.norm_eps)
    return q, k


def attention(
    layer: Params,
    x: jax.Array,
    positions: jax.Array,
    cache: tuple[jax.Array, jax.Array] | PagedLayer | None,
    *,
    config: ModelConfig,
    attend_len: int,
    segment_ids: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
    lora: Any = None,
    queries_last: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | PagedLayer | None]:
    """Grouped-query attention; a query at position p sees keys at positions <= p.

    ``cache``: this layer's ``(k_cache, v_cache)`` of a contiguous ``KVCache``, or its
    ``PagedLayer`` (block pool and block tables). With a cache, this chunk's keys and values are
    written into it at ``positions`` first, then the first ``attend_len`` positions of each row
    are read, so a step costs what it attends to, not the cache's capacity. Without a cache
    (training, scoring) the chunk attends to itself; with ``segment_ids [B, T]`` (packed training
    rows) a query sees only keys of its own segment and not after it in the row, and with
    ``branch_ids [B, T]`` as well only keys of branch 0 (a prefix its segment's branches share)
    or of its own branch. ``queries_last``: every row's ``T`` queries are the last ``T`` of its
    ``attend_len`` positions (a prefill chunk after a prefix all rows share the length of).
    """
    batch, seq = x.shape[:2]
    kv_heads, groups, head_dim = config.n_kv_heads, config.n_heads // config.n_kv_heads, config.head_dim
    q = linear("btd,dhk->bthk", x, layer["wq"], lora=_lora(lora, "wq"))
    k = linear("btd,dhk->bthk", x, layer["wk"], lora=_lora(lora, "wk"))
    v = linear("btd,dhk->bthk", x, layer["wv"], lora=_lora(lora, "wv"))
    q, k = _rope_and_qk_norm(layer, q, k, positions, config)
    q = constrain(q, ("batch", "seq", "act_heads", "head_dim"))
    # Whole sequences of keys and values on every device: exact attention under sequence sharding.
    k = constrain(k, ("batch", "kv_seq", "act_kv_heads", "head_dim"))
    v = constrain(v, ("batch", "kv_seq", "act_kv_heads", "head_dim"))

    # Keys as [B, KV, head_dim, S] and values as [B, KV, S, head_dim] (the cache's layouts), and
    # the queries of one KV group side by side, so neither matmul transposes its operands.
    if cache is None:
        keys, values, key_positions = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), positions[:, None, :]
    else:
        if isinstance(cache, PagedLayer):
            cache = cache.write(k, v, positions)
            if seq == 1:
                q = q.reshape(batch, kv_heads, groups, head_dim)
                lengths = positions[:, 0] + 1
                if cache.k.dtype == q.dtype == jnp.float32 and kernels.on_cpu():
                    # Decoding on CPU: the native kernel reads each row's blocks in place.
                    scale = 1 / math.sqrt(head_dim)
                    out = kernels.paged_decode_attention(q, cache.k, cache.v, cache.tables, lengths, scale)
                else:
                    out = cache.decode_attention(q, lengths, attend_len)
                out = out.reshape(batch, 1, config.n_heads, head_dim)
                return linear("bthk,hkd->btd", out, layer["wo"], lora=_lora(lora, "wo")), cache
            # Each row's blocks gathered in the contiguous layout (zeros past its allocation).
            k_cache, v_cache = cache.read(attend_len, q.dtype)
        else:
            rows = jnp.arange(batch)[:, None]
            k_cache, v_cache = cache
            k_cache = k_cache.at[rows, :, :, positions].set(k.astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[rows, :, positions].set(v.astype(v_cache.dtype), mode="drop")
            cache = (k_cache, v_cache)
        # The cache may hold more rows than this call feeds (the engine pads decode batches).
        if seq == 1 and k_cache.dtype == q.dtype == jnp.float32 and kernels.on_cpu():
            # Decoding on CPU: the native kernel reads each row's visible positions in place.
            q = q.reshape(batch, kv_heads, groups, head_dim)
            out = kernels.decode_attention(q, k_cache, v_cache, positions[:, 0] + 1, 1 / math.sqrt(head_dim))
            out = out.reshape(batch, 1, config.n_heads, head_dim)
            return linear("bthk,hkd->btd", out, layer["wo"], lora=_lora(lora, "wo")), cache
        keys, values = k_cache[:batch, ..., :attend_len], v_cache[:batch, :, :attend_len]
        key_positions = jnp.arange(attend_len)[None, None, :]
    # Queries as [B, KV, groups, T, head_dim]: the groups of one KV head side by side (so neither
    # matmul transposes its operands) with the sequence kept as its own axis, so that under
    # sequence parallelism each device keeps its slice of the queries (merging groups with the
    # sequence would make XLA gather the queries and split the keys instead).
    q = q.reshape(batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = constrain(q, ("batch", "act_kv_heads", None, "seq", "head_dim"))
    visible = key_positions[:, :, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
    if segment_ids is not None:  # packed documents never attend to each other; nor to later keys,
        # which only padding (segment 0, all at position 0) would otherwise see
        visible &= segment_ids[:, None, None, :] == segment_ids[:, None, :, None]
        visible &= jnp.arange(seq)[None, None, :, None] >= jnp.arange(seq)[None, None, None, :]
    if branch_ids is not None:  # branches of one segment share its branch-0 prefix, never each other
        key_branch = branch_ids[:, None, None, :]
        visible &= (key_branch == 0) | (key_branch == branch_ids[:, None, :, None])
    # A packed row, or a prefill chunk that ends each row's keys (queries_last), sees no key after
    # its query, so each block of queries needs only the keys up to its end: about half the
    # scores of a long chunk that starts a row. Not when the sequence is split over devices (each
    # keeps its slice of the queries).
    causal = segment_ids is not None or queries_last  # segments: the keys are the chunk itself
    block = CAUSAL_BLOCK if causal and seq % CAUSAL_BLOCK == 0 else seq
    if block == seq or ways_split("seq", seq) > 1:
        out = _attend(q, keys, values, visible)
    else:
        before = keys.shape[-1] - seq  # keys before the chunk's first query
        out = jnp.concatenate(
            [
                _attend(
                    q[:, :, :, start : start + block],
                    keys[..., : before + start + block],
                    values[:, :, : before + start + block],
                    visible[:, :, start : start + block, : before + start + block],
                )
                for start in range(0, seq, block)
            ],
            axis=3,
        )
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, config.n_heads, head_dim)
    return linear("bthk,hkd->btd", out, layer["wo"], lora=_lora(lora, "wo")), cache


def _attend(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax attention of queries ``[B, KV, G, T, D]`` over keys ``[B, KV, D, S]`` and values
    ``[B, KV, S, D]`` where ``visible [B, 1, T, S]``; scores and softmax in fp32."""
    with jax.named_scope("attention_scores"):
        scores = jnp.einsum("bkgtd,bkds->bkgts", q, keys).astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, values)


def mlp(layer: Params, x: jax.Array, *, lora: Any = None) -> jax.Array:
    gate = linear("btd,df->btf", x, layer["w_gate"], lora=_lora(lora, "w_gate"))
    up = linear("btd,df->btf", x, layer["w_up"], lora=_lora(lora, "w_up"))
    gate, up = (constrain(a, ("batch", "seq", "act_mlp")) for a in (gate, up))
    return linear("btf,fd->btd", jax.nn.silu(gate) * up, layer["w_down"], lora=_lora(lora, "w_down"))


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | PagedKVCache | None,
    *,
    config: ModelConfig,
    attend_len: int = 0,
    activation_dtype: Any = None,
    segment_ids: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
    adapters: Any = None,
    dropout: tuple[float, jax.Array] | None = None,
    recompute: bool = False,
    queries_last: bool = False,
) -> tuple[jax.Array, KVCache | PagedKVCache | None]:
    """Hidden states after the final norm, ``[B, T, d_model]``, and the updated cache.

    Activations are ``activation_dtype`` (default: the embedding's dtype); matmuls run in each
    weight's precision (see ``linear``).

    ``tokens`` and ``positions`` are ``[B, T]``: each row holds consecutive positions starting
    wherever that row is. With a cache, the first ``attend_len`` cache positions of each row are
    attended to (a ``PagedKVCache`` carries the rows' block ``tables``).
    Without one (training, scoring), the chunk attends to itself only; ``segment_ids [B, T]``
    then keeps packed documents apart (give each document positions that restart at 0), and
    ``branch_ids [B, T]`` lets several continuations of one document share its prefix: branch 0
    is the prefix, and a token of branch b > 0 sees the prefix and branch b only (give each
    branch the positions that follow the prefix).

    ``adapters``: optional LoRA adapters (``afmkit.adapters.lora``: one for every row, or a bank
    gathered per row); anything with ``.layer(i)`` returning that layer's updates or None.

    ``dropout``: ``(rate, key)`` drops that share of each attention and MLP output before it is
    added to the residual stream (training only; the survivors are scaled by ``1 / (1 - rate)``).

    ``recompute`` (without a cache): the gradient recomputes each layer's activations from its
    input instead of keeping them, so a training step holds one layer's at a time, for one more
    forward pass (the values are the same up to the order of fp32 sums).

    ``queries_last`` (with a cache): every row's ``T`` positions are the last ``T`` of its
    ``attend_len`` (a prefill chunk after a prefix all rows share the length of), so attention
    skips the keys after each block of queries (the same values up to the order of fp32 sums).
    """
    if (segment_ids is not None or branch_ids is not None) and cache is not None:
        raise ValueError("segment_ids mask packed training rows; they do not combine with a KV cache")
    if queries_last and cache is None:
        raise ValueError("queries_last places a chunk at the end of each row's cache; pass the cache")
    embed = params["embed"]
    if not isinstance(embed, PackedWeight):
        # Under FSDP, gather the table's model dimension before the lookup (as FSDP does for every
        # weight); looking rows up in a table split along it would need the rows to change layout
        # from "split by model dimension" to "split by batch", which XLA can only do through a
        # full replication ("involuntary full rematerialization").
        embed = constrain(embed, ("vocab", None))
    x = embed_lookup(embed, tokens).astype(activation_dtype or params["embed"].dtype)
    x = constrain(x, ("batch", "seq", "act_embed"))
    masks = {"segment_ids": segment_ids, "branch_ids": branch_ids}
    new_layers = []
    for i, (layer, layer_cache) in enumerate(
        zip(params["layers"], cache.layers() if cache else [None] * len(params["layers"]))
    ):
        if cache is None and recompute:
            # Every array the layer reads is an argument: a custom VJP may not close over them.
            def run(x, layer, adapter, positions, masks, drop_key, i=i):
                drop = None if drop_key is None else (dropout[0], drop_key)
                lora = None if adapter is None else adapter.layer(0)
                return decoder_layer(x, layer, positions, None, lora, config, attend_len, masks, drop, i)[0]

            adapter = None if adapters is None else adapters.only_layer(i)
            drop_key = None if dropout is None else dropout[1]
            x = _recomputed_in_backward(run)(x, layer, adapter, positions, masks, drop_key)
        else:
            lora = None if adapters is None else adapters.layer(i)
            x, layer_cache = decoder_layer(
                x, layer, positions, layer_cache, lora, config, attend_len, masks, dropout, i, queries_last=queries_last
            )
        new_layers.append(layer_cache)
    return rms_norm(x, params["final_norm"], config.norm_eps), cache.with_layers(new_layers) if cache else None


def decoder_layer(
    x: jax.Array,
    layer: Params,
    positions: jax.Array,
    layer_cache: Any,
    lora: Any,
    config: ModelConfig,
    attend_len: int,
    masks: dict[str, jax.Array | None],
    dropout: tuple[float, jax.Array] | None,
    index: int,
    *,
    queries_last: bool = False,
) -> tuple[jax.Array, Any]:
    """One pre-norm block, attention then MLP, each added to the residual stream ``x``."""
    attn_out, layer_cache = attention(
        layer,
        rms_norm(x, layer["attn_norm"], config.norm_eps),
        positions,
        layer_cache,
        config=config,
        attend_len=attend_len,
        lora=lora,
        queries_last=queries_last,
        **masks,
    )
    x = x + _dropout(attn_out, dropout, 2 * index)
    x = x + _dropout(mlp(layer, rms_norm(x, layer["mlp_norm"], config.norm_eps), lora=lora), dropout, 2 * index + 1)
    return constrain(x, ("batch", "seq", "act_embed")), layer_cache


def _recomputed_in_backward(fn: Any) -> Any:
    """``fn(x, *rest)`` whose backward pass recomputes its forward from its inputs instead of
    keeping its activations, and only once the output's cotangent exists. ``jax.checkpoint``
    saves nothing on XLA:CPU: the recomputation's inputs all exist after the forward pass, so it
    is merged with the forward's own computation and every layer's activations stay alive (a
    LoRA SFT step of SmolLM2 at 8 x 512 tokens: 11.4 GiB of temporaries, 0.84 GiB with this;
    ``benchmarks/results/train_memory.json``). Making the recomputation's input depend on the
    cotangent keeps one layer's activations alive at a time."""

    @jax.custom_vjp
    def run(*args: Any) -> Any:
        return fn(*args)

    def run_forward(*args: Any) -> tuple[Any, Any]:
        return fn(*args), args

    def run_backward(args: Any, cotangent: jax.Array) -> Any:
        x, *rest = args
        # x + 0 * (one cotangent value) is x, but XLA does not fold it away (0 * NaN is NaN), so
        # the recomputation can neither start before the cotangent exists nor merge with the forward.
        x = x + (cotangent.ravel()[0] * 0).astype(x.dtype)
        return jax.vjp(fn, x, *rest)[1](cotangent)

    run.defvjp(run_forward, run_backward)
    return run


def _dropout(x: jax.Array, dropout: tuple[float, jax.Array] | None, index: int) -> jax.Array:
    """Residual dropout (inverted: kept values scaled up, so evaluation needs no rescaling)."""
    if dropout is None or dropout[0] <= 0:
        return x
    rate, key = dropout
    keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def embed_lookup(embed: Any, tokens: jax.Array) -> jax.Array:
    """The embedding rows of ``tokens`` (dequantized when the table is packed)."""
    return embed.rows(tokens) if isinstance(embed, PackedWeight) else embed[tokens]


def output_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Vocabulary logits from final hidden states, through the shared embedding (fp32)."""
    if "lm_head" in params:
        return linear("...d,dv->...v", hidden.astype(jnp.float32), params["lm_head"])
    return linear("...d,vd->...v", hidden.astype(jnp.float32), params["embed"])


def logits_fn(
    params: Params, tokens: jax.Array, *, config: ModelConfig, activation_dtype: Any = None, adapters: Any = None
) -> jax.Array:
    """Logits for every position of ``tokens [B, T]``, without a cache (training, scoring)."""
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    hidden, _ = forward(
        params, tokens, positions, None, config=config, activation_dtype=activation_dtype, adapters=adapters
    )
    return output_logits(params, hidden)


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood of ``targets`` under ``logits [..., V]``, in fp32, and the
    log-partition ``logsumexp(logits)`` it used (the z-loss's input): both shaped like ``targets``.

    The one place afmkit turns logits into token losses: training, perplexity and adapter
    training all call it."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def cross_entropy_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *, z_loss: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean next-token cross-entropy plus AFM's auxiliary z-loss ``z_loss * logsumexp^2``
    (pass the model's ``ModelConfig.z_loss``; 0 turns it off). Returns the loss and its parts."""
    nll, log_z = token_nll(logits, targets)
    if mask is None:
        mask = jnp.ones_like(nll)
    mask = mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    ce = (nll * mask).sum() / count
    z = (jnp.square(log_z) * mask).sum() / count
    return ce + z_loss * z, {"cross_entropy": ce, "z_loss": z}
