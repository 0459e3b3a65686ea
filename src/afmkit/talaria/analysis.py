"""Talaria's analysis of one model: a row per operation with its parameters, bytes at each bit
width, FLOPs per token, measured time on this machine and sensitivity.

**Operations.** Per layer: the seven matrices (``wq wk wv wo w_gate w_up w_down``), the attention
core (RoPE, q/k norms, scores, softmax, values; the KV cache of ``context`` tokens), the two
RMSNorms; once: the embedding lookup, the output head (tied to the embedding: the same bytes read
again) and the final norm.

**Measured time** comes from micro-benchmarks of the functions the model runs
(``model.transformer.linear`` on a float or ``PalettizedWeight`` matrix, ``attention`` with a KV
cache, ``rms_norm``, ``embed_lookup``, ``output_logits`` on the 8/4-bit packed embedding), each
timed as its marginal cost inside a compiled program (``marginal_seconds``: chains of 2 and 10
calls, each timed ``repeats`` times, the difference of the medians per extra call), so what a
call costs once (dispatch, argument handling), which a single compiled decode step does not pay
per op, cancels. Matrices of one shape share a benchmark, per width. The attention core is ``attention``'s
time less its four float projections (it has no entry point of its own). Decode feeds one token
with ``context`` cached; prefill feeds ``context`` tokens and is reported per token.

**Cache.** ``$AFMKIT_CACHE/talaria/<fingerprint>-<key>.json``, the key hashing the settings, the
CPU and the sensitivity analysis it used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.compress.allocate import BIT_WIDTHS, matrix_storage_bits
from afmkit.compress.palettize import LAYER_MATRICES
from afmkit.errors import UserError
from afmkit.kernels import cpu_name
from afmkit.model.packed import INPUT_AXES, pack
from afmkit.model.palettized import from_codes
from afmkit.progress import ProgressReporter
from afmkit.runtime import cache_dir
from afmkit.talaria.settings import TalariaSettings

FORMAT = "afmkit-talaria-analysis"
VERSION = 2
_DEFAULTS = TalariaSettings()
EMBED_BITS = (4, 8)
FP32 = 4  # bytes
SPECS = {  # the einsum each matrix runs in the model (transformer.attention / mlp)
    "wq": "btd,dhk->bthk",
    "wk": "btd,dhk->bthk",
    "wv": "btd,dhk->bthk",
    "wo": "bthk,hkd->btd",
    "w_gate": "btd,df->btf",
    "w_up": "btd,df->btf",
    "w_down": "btf,fd->btd",
}
FORMATS = ("float", *map(str, BIT_WIDTHS))  # a matrix's formats, as JSON keys
# Every perplexity window in one compiled call: batches of 4 left a smaller last batch, a second
# compilation of the whole model (tens of seconds on 2 loaded cores). The windows still run one at
# a time inside it (``lax.map``), so memory and the result do not change.
_ALL_WINDOWS = 1 << 30


# -- timing ---------------------------------------------------------------------------------------


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` (jitted, warmed up twice, blocked on)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


CHAIN = (2, 10)  # op counts of the two chains whose time difference is an op's marginal time


def marginal_seconds(op: Callable[..., Any], x: jax.Array, *rest: Any, repeats: int) -> float:
    """Seconds one more ``op(x, *rest)`` adds inside a compiled program.

    Two programs apply ``op`` ``CHAIN[0]`` and ``CHAIN[1]`` times in a row, each input depending
    on the previous output through a zero passed at run time (so no call is merged or skipped);
    the difference of their medians over the difference of the counts cancels what a call costs
    once (dispatch, argument handling, waking threads), which a model's single compiled decode
    step does not pay per op. Subtracting a trivial call's time instead left 36-65% too much on
    SmolLM2's decode (docs/talaria.md).
    """
    zero = jnp.zeros((), jnp.float32)

    def chain(n: int) -> Callable[..., Any]:
        def run(x, zero, *rest):
            for _ in range(n):
                x = x + (jnp.sum(op(x, *rest)) * zero).astype(x.dtype)
            return x

        return jax.jit(run)

    short, long = CHAIN
    seconds = median_seconds(chain(long), x, zero, *rest, repeats=repeats)
    seconds -= median_seconds(chain(short), x, zero, *rest, repeats=repeats)
    return seconds / (long - short)


def probe_cpu(repeats: int = 5) -> dict[str, Any]:
    """This machine's sustained fp32 FLOP/s (a 1024^3 matmul) and memory bandwidth (a sum over
    256 MiB, larger than any cache), through JAX as the model runs."""
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    flops = 2 * n**3 / median_seconds(matmul, a, repeats=repeats)
    big = jnp.ones((64 * 2**20,), jnp.float32)
    total = jax.jit(jnp.sum)
    bandwidth = big.nbytes / median_seconds(total, big, repeats=repeats)
    return {"flops": flops, "bandwidth": bandwidth, "cpu": cpu_name(), "threads": os.cpu_count() or 1}


# -- the operations ---------------------------------------------------------------------------------


def matrix_bytes(k: int, n: int, fmt: str, *, group_rows: int, per_row_scale: bool) -> float:
    """Bytes stored for a ``K x N`` matrix in ``fmt`` ("float": fp32; "2".."8": palettized)."""
    if fmt == "float":
        return FP32 * k * n
    return matrix_storage_bits(k, n, int(fmt), group_rows=group_rows, per_row_scale=per_row_scale) / 8


def embed_bytes(vocab: int, d: int, bits: int | str) -> float:
    """The packed embedding: ``bits`` per value plus an fp16 scale per block of 32 (``model.packed``)."""
    if bits == "float":
        return FP32 * vocab * d
    return vocab * d * int(bits) / 8 + vocab * (d // 32) * 2


def bench_key(kind: str, shape: tuple[int, ...]) -> str:
    """The micro-benchmark a matrix shares with every matrix of the same einsum and shape."""
    return f"{SPECS[kind]}:{'x'.join(map(str, shape))}"


def operations(
    config: Any,
    shapes: Mapping[str, tuple[int, int]],
    *,
    context: int,
    group_rows: int,
    per_row_scale: bool,
    shape_of: Mapping[str, tuple[int, ...]],
) -> list[dict[str, Any]]:
    """One row per operation: parameters, FLOPs per token (decode with ``context`` cached; prefill
    of a ``context``-token prompt) and bytes per token at each format (decode reads every weight
    once per token; prefill once per prompt)."""
    d, h, kv, hd, v = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.vocab_size
    rows: list[dict[str, Any]] = []
    norm = {"params": d, "flops_decode": 4 * d, "flops_prefill": 4 * d}
    norm_bytes = FP32 * 3 * d  # scale, input, output
    rows.append(
        {
            "name": "embed",
            "layer": None,
            "kind": "embed",
            "group": "embedding",
            "params": v * d,
            "flops_decode": d,
            "flops_prefill": d,
            "bytes_decode": {str(b): embed_bytes(1, d, b) + FP32 * d for b in EMBED_BITS},
            "bytes_prefill": {str(b): embed_bytes(1, d, b) + FP32 * d for b in EMBED_BITS},
            "bench": "embed",
        }
    )
    for i in range(config.n_layers):
        rows.append(
            {
                "name": f"layers.{i}.attn_norm",
                "layer": i,
                "kind": "attn_norm",
                "group": "norm",
                **norm,
                "bytes_decode": {"-": norm_bytes},
                "bytes_prefill": {"-": norm_bytes},
                "bench": "norm",
            }
        )
        for kind in LAYER_MATRICES:
            name = f"layers.{i}.{kind}"
            if name not in shapes:
                continue
            k, n = shapes[name]
            if kind == "w_gate":  # attention's rows first, in the order the layer runs them
                rows.append(_attention_row(i, h, kv, hd, context))
                rows.append(
                    {
                        "name": f"layers.{i}.mlp_norm",
                        "layer": i,
                        "kind": "mlp_norm",
                        "group": "norm",
                        **norm,
                        "bytes_decode": {"-": norm_bytes},
                        "bytes_prefill": {"-": norm_bytes},
                        "bench": "norm",
                    }
                )
            stored = {f: matrix_bytes(k, n, f, group_rows=group_rows, per_row_scale=per_row_scale) for f in FORMATS}
            act = FP32 * (k + n)
            rows.append(
                {
                    "name": name,
                    "layer": i,
                    "kind": kind,
                    "group": "matrix",
                    "params": k * n,
                    "k": k,
                    "n": n,
                    "flops_decode": 2 * k * n,
                    "flops_prefill": 2 * k * n,
                    "bytes_decode": {f: s + act for f, s in stored.items()},
                    "bytes_prefill": {f: s / context + act for f, s in stored.items()},
                    "bench": bench_key(kind, shape_of[name]),
                }
            )
    rows.append(
        {
            "name": "final_norm",
            "layer": None,
            "kind": "final_norm",
            "group": "norm",
            **norm,
            "bytes_decode": {"-": norm_bytes},
            "bytes_prefill": {"-": norm_bytes},
            "bench": "norm",
        }
    )
    head = {str(b): embed_bytes(v, d, b) for b in EMBED_BITS}
    rows.append(
        {
            "name": "output_head",
            "layer": None,
            "kind": "output_head",
            "group": "head",
            "params": 0 if config.tie_embeddings else v * d,  # tied: the embedding's parameters, read again
            "flops_decode": 2 * d * v,
            "flops_prefill": 2 * d * v,
            "bytes_decode": {b: s + FP32 * (d + v) for b, s in head.items()},
            "bytes_prefill": {b: s / context + FP32 * (d + v) for b, s in head.items()},
            "bench": "head",
        }
    )
    return rows


def _attention_row(layer: int, h: int, kv: int, hd: int, context: int) -> dict[str, Any]:
    # scores and values: 2 FLOPs per multiply-add, q.k and p.v over every attended position
    decode_flops = 4 * h * hd * context
    prefill_flops = 4 * h * hd * (context + 1) / 2  # a prompt's token attends to half of it on average
    cache_read = 2 * kv * hd * context * FP32
    return {
        "name": f"layers.{layer}.attention",
        "layer": layer,
        "kind": "attention",
        "group": "attention",
        "params": 0,
        "flops_decode": decode_flops,
        "flops_prefill": prefill_flops,
        "bytes_decode": {"-": cache_read + FP32 * (h + 2 * kv) * hd * 2},
        "bytes_prefill": {"-": 2 * kv * hd * FP32 + FP32 * (h + 2 * kv) * hd * 2},
        "bench": "attention",
    }


# -- micro-benchmarks -----------------------------------------------------------------------------


def _random_palettized(
    shape: tuple[int, ...], in_axes: tuple[int, ...], bits: int, group_rows: int, rng: np.random.Generator
) -> Any:
    k = math.prod(shape[a] for a in in_axes)
    n = math.prod(shape) // k
    codes = rng.integers(0, 2**bits, size=(k, n))
    tables = np.sort(rng.standard_normal((n // group_rows, 2**bits)), axis=1) * 0.02
    return from_codes(codes, tables, np.ones(n), bits=bits, shape=shape, in_axes=in_axes)


def benchmark_ops(
    config: Any, params: Mapping[str, Any], *, context: int, repeats: int, group_rows: int, quiet: bool = False
) -> dict[str, dict[str, dict[str, float]]]:
    """Seconds per token of each benchmark key (``operations``' ``bench``), per format, for
    decode and prefill: ``{"decode": {key: {fmt: s}}, "prefill": ...}``."""
    rng = np.random.default_rng(0)
    layer = params["layers"][0]
    d = config.d_model
    # one benchmark per distinct (einsum, shape): wk and wv, w_gate and w_up share theirs
    kinds = list({(SPECS[k], np.shape(layer[k])): k for k in reversed(LAYER_MATRICES) if k in layer}.values())[::-1]
    tasks = [(k, f) for k in kinds for f in FORMATS] + [("norm", "-"), ("attention", "-")]
    tasks += [("embed", str(b)) for b in EMBED_BITS] + [("head", str(b)) for b in EMBED_BITS]
    out: dict[str, dict[str, dict[str, float]]] = {"decode": {}, "prefill": {}}
    embed = np.asarray(params["embed"], np.float32)
    packed_embed = {str(b): pack(embed, b, INPUT_AXES["embed"]) for b in EMBED_BITS}
    positions = {"decode": jnp.full((1, 1), context - 1, jnp.int32), "prefill": jnp.arange(context)[None]}
    with ProgressReporter("talaria: timing ops", 2 * len(tasks), unit="benchmarks", quiet=quiet) as progress:
        for mode, tokens in (("decode", 1), ("prefill", context)):
            for kind, fmt in tasks:
                if kind in SPECS:
                    w = np.asarray(layer[kind], np.float32)
                    weight = (
                        jnp.asarray(w)
                        if fmt == "float"
                        else _random_palettized(w.shape, INPUT_AXES[kind], int(fmt), group_rows, rng)
                    )
                    in_shape = (1, tokens, *(w.shape[a] for a in INPUT_AXES[kind]))
                    x = jnp.asarray(rng.standard_normal(in_shape), jnp.float32)
                    op = functools.partial(_linear, SPECS[kind])
                    seconds = marginal_seconds(op, x, weight, repeats=repeats)
                    key = bench_key(kind, w.shape)
                elif kind == "norm":
                    x = jnp.asarray(rng.standard_normal((1, tokens, d)), jnp.float32)
                    scale = jnp.asarray(layer["attn_norm"], jnp.float32)
                    seconds = marginal_seconds(_norm(config.norm_eps), x, scale, repeats=repeats)
                    key = "norm"
                elif kind == "attention":
                    seconds = _attention_seconds(
                        config, layer, mode, tokens, context, positions[mode], repeats, rng, out[mode]
                    )
                    key = "attention"
                elif kind == "embed":
                    ids = jnp.asarray(rng.integers(0, config.vocab_size, (1, tokens)), jnp.int32)
                    seconds = marginal_seconds(_embed, ids, packed_embed[fmt], repeats=repeats)
                    key = "embed"
                else:
                    hidden = jnp.asarray(rng.standard_normal((1, tokens, d)), jnp.float32)
                    seconds = marginal_seconds(_head, hidden, packed_embed[fmt], repeats=repeats)
                    key = "head"
                out[mode].setdefault(key, {})[fmt] = max(seconds, 0.0) / tokens
                progress.advance(1)
    return out


def _linear(spec: str, x: jax.Array, w: Any) -> jax.Array:
    from afmkit.model.transformer import linear

    return linear(spec, x, w)


def _norm(eps: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    from afmkit.model.transformer import rms_norm

    return lambda x, scale: rms_norm(x, scale, eps)


def _embed(ids: jax.Array, table: Any) -> jax.Array:
    from afmkit.model.transformer import embed_lookup

    return embed_lookup(table, ids)


def _head(hidden: jax.Array, table: Any) -> jax.Array:
    from afmkit.model.transformer import output_logits

    return output_logits({"embed": table}, hidden)


def _attention_seconds(config, layer, mode, tokens, context, positions, repeats, rng, measured) -> float:
    """``attention``'s time less its four float projections (measured just before, same mode)."""
    from afmkit.model.kv_cache import KVCache
    from afmkit.model.transformer import attention

    float_layer = {k: jnp.asarray(v, jnp.float32) for k, v in layer.items()}
    x = jnp.asarray(rng.standard_normal((1, tokens, config.d_model)), jnp.float32)
    if mode == "decode":
        cache = KVCache.zeros(config, batch=1, capacity=context).layers()[0]
        total = marginal_seconds(
            lambda x, lay, pos, c: attention(lay, x, pos, c, config=config, attend_len=context)[0],
            x,
            float_layer,
            positions,
            cache,
            repeats=repeats,
        )
    else:
        total = marginal_seconds(
            lambda x, lay, pos: attention(lay, x, pos, None, config=config, attend_len=0)[0],
            x,
            float_layer,
            positions,
            repeats=repeats,
        )
    projections = sum(
        measured[bench_key(kind, np.shape(layer[kind]))]["float"] * tokens for kind in ("wq", "wk", "wv", "wo")
    )
    return total - projections


# -- the whole analysis ---------------------------------------------------------------------------


def analysis_key(settings: TalariaSettings, sensitivity_dir: str, eval_sha: str) -> str:
    payload = [VERSION, settings.context, settings.repeats, cpu_name(), os.cpu_count(), sensitivity_dir, eval_sha]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def talaria_cache(fingerprint: str, key: str) -> Path:
    return cache_dir() / "talaria" / f"{fingerprint}-{key}.json"


def eval_text_of(settings: TalariaSettings, calibration: Mapping[str, Any]) -> tuple[str, str]:
    """(the perplexity text, its description): ``--eval-text`` or the calibration file's text the
    calibration never reads."""
    from afmkit.eval.perplexity import read_text

    if settings.eval_text is not None:
        return read_text(
            settings.eval_text, max_chars=settings.eval_chars
        ), f"{settings.eval_text} (first {settings.eval_chars} characters)"
    text = Path(calibration["file"]).read_text(encoding="utf-8")
    start = int(calibration["start"])
    if start >= 2000:
        return text[
            : min(start, settings.eval_chars)
        ], f"{calibration['file']} characters 0-{min(start, settings.eval_chars)} (before the calibration)"
    after = start + 6 * int(calibration["tokens"])  # read_calibration reads at most this far
    held_out = text[after : after + settings.eval_chars]
    if len(held_out) < 2000:
        raise UserError(
            f"no held-out text in {calibration['file']} for perplexity (the calibration reads almost all of it); give --eval-text FILE"
        )
    return held_out, f"{calibration['file']} characters {after}-{after + len(held_out)} (after the calibration)"


def sensitivity_analysis(model: Any, fingerprint: str, settings: TalariaSettings, *, quiet: bool) -> Any:
    """The compressor's analysis: with ``--calibration``, the cached one for that text (computed
    with a progress bar when absent); without, the newest cached one of this model."""
    from afmkit.compress import sensitivity
    from afmkit.compress.settings import CompressSettings

    if settings.calibration is None:
        found = [a for a in sensitivity.find_analyses() if a.fingerprint == fingerprint]
        if not found:
            raise UserError(
                f"no cached sensitivity analysis of {model.name}; give --calibration FILE (UTF-8 text, never your "
                "evaluation text) and Talaria runs one"
            )
        return found[0]
    compress_settings = CompressSettings(
        calibration=settings.calibration,
        calibration_start=settings.calibration_start,
        calibration_tokens=settings.calibration_tokens,
        seq_len=settings.seq_len,
    )
    calibration = sensitivity.read_calibration(
        settings.calibration,
        model.tokenizer,
        start=settings.calibration_start,
        tokens=settings.calibration_tokens,
        seq_len=settings.seq_len,
    )
    return sensitivity.analyze(
        model.config,
        model.params,
        calibration,
        model_name=model.name,
        fingerprint=fingerprint,
        settings=compress_settings,
        quiet=quiet,
    )


def analyze_model(model: Any, settings: TalariaSettings = _DEFAULTS, *, quiet: bool = False) -> dict[str, Any]:
    """The page's data for ``model`` (a float ``LanguageModel``), from the cache when it matches."""
    from afmkit.compress import sensitivity
    from afmkit.eval.perplexity import perplexity_of_text
    from afmkit.talaria.profiles import profiles

    fingerprint = sensitivity.model_fingerprint(model.config, model.params)
    found = sensitivity_analysis(model, fingerprint, settings, quiet=quiet)
    text, text_source = eval_text_of(settings, found.calibration)
    eval_sha = hashlib.sha256(text.encode()).hexdigest()
    path = talaria_cache(fingerprint, analysis_key(settings, str(found.directory), eval_sha))
    if not settings.no_cache:
        try:
            cached = json.loads(path.read_text())
            if cached.get("format") == FORMAT and cached.get("version") == VERSION:
                # the public figures are code, not measurements: always today's
                cached["profiles"] = [p.to_json() for p in profiles(cached["probe"])]
                return cached
        except (OSError, ValueError):
            pass
    seconds: dict[str, float] = {}
    begin = time.perf_counter()
    probe = probe_cpu()
    seconds["probe"] = time.perf_counter() - begin
    group_rows = found.settings["group_rows"]
    per_row_scale = found.settings["per_row_scale"]
    begin = time.perf_counter()
    bench = benchmark_ops(
        model.config,
        model.params,
        context=settings.context,
        repeats=settings.repeats,
        group_rows=group_rows,
        quiet=quiet,
    )
    seconds["benchmarks"] = time.perf_counter() - begin
    begin = time.perf_counter()
    eval_seq = min(512, model.config.max_seq_len)
    float_ppl = perplexity_of_text(
        model, text, seq_len=eval_seq, stride=eval_seq // 2, batch_size=_ALL_WINDOWS
    ).perplexity
    seconds["float_perplexity"] = time.perf_counter() - begin
    from afmkit.compress.sensitivity import get_matrix

    shape_of = {name: tuple(np.shape(get_matrix(model.params, name))) for name in found.shapes}
    rows = operations(
        model.config,
        found.shapes,
        context=settings.context,
        group_rows=group_rows,
        per_row_scale=per_row_scale,
        shape_of=shape_of,
    )
    for row in rows:
        row["sensitivity"] = (
            {str(b): v for b, v in found.sensitivity[row["name"]].items()} if row["name"] in found.sensitivity else None
        )
        row["measured_decode"] = bench["decode"][row["bench"]]
        row["measured_prefill"] = bench["prefill"][row["bench"]]
    result = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": model.name, "fingerprint": fingerprint, "config": model.config.to_dict()},
        "matrices": list(found.shapes),
        "context": settings.context,
        "group_rows": group_rows,
        "per_row_scale": per_row_scale,
        "widths": list(BIT_WIDTHS),
        "embed_widths": list(EMBED_BITS),
        "sensitivity": {
            "kind": found.kind,
            "directory": str(found.directory),
            "calibration": found.calibration,
            "settings": found.settings,
        },
        "eval": {
            "source": text_source,
            "sha256": eval_sha,
            "seq_len": eval_seq,
            "stride": eval_seq // 2,
            "float_perplexity": float_ppl,
        },
        "probe": probe,
        "profiles": [p.to_json() for p in profiles(probe)],
        "rows": rows,
        "seconds": seconds,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=float))
    tmp.replace(path)
    return result
