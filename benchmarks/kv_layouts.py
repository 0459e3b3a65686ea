"""Engine decode throughput with the paged and the contiguous KV cache, side by side.

Both engines share one model and one process and run in turn (after a warm-up that compiles
every shape), so the ratio is fair on a busy machine; the best of ``--repeats`` is reported, for
each batch size in ``--rows`` (e.g. ``1,8,32``). Prints one JSON object (``--out`` also writes it)::

    nice -n 10 python benchmarks/kv_layouts.py --rows 1,8,32 --out benchmarks/results/kv_layouts.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import afmkit
from afmkit import kernels
from afmkit.errors import UserError
from afmkit.infer.engine import Engine, KVSettings, Request
from afmkit.infer.sampling import SamplingParams

LAYOUTS = ("paged", "contiguous")


def measure(model, rows: int, new_tokens: int, repeats: int, page: int) -> dict:
    """Decode tokens/s of both layouts on ``rows`` prompts decoded together."""
    tok = model.tokenizer
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": f"Write a story about the number {i}."}], add_generation_prompt=True
            )
        )
        for i in range(rows)
    ]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    engines = {
        layout: Engine(
            model.config,
            model.params,
            tok,
            eos_ids=tok.stop_ids,
            max_batch=rows,
            kv=KVSettings(layout=layout, page=page),
        )
        for layout in LAYOUTS
    }
    outputs = {layout: engine.generate(prompts, sampling) for layout, engine in engines.items()}  # compiles
    same = [c.tokens for c in outputs["paged"]] == [c.tokens for c in outputs["contiguous"]]
    runs: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    for _ in range(repeats):
        for layout, engine in engines.items():
            start = time.perf_counter()
            completions = engine.generate(prompts, sampling)
            seconds = time.perf_counter() - start
            runs[layout].append(sum(len(c.tokens) for c in completions) / seconds)
    best = {layout: max(values) for layout, values in runs.items()}
    return {
        "tokens_per_second": runs,
        "best": best,
        "paged_over_contiguous": best["paged"] / best["contiguous"],
        "greedy_tokens_identical": same,
    }


def attention_only(rows: int, positions: int, page: int, repeats: int = 200) -> dict:
    """The two native decode-attention kernels alone on SmolLM2's attention shape (3 KV heads of
    3 query heads, head_dim 64), ``rows`` rows of ``positions`` keys each, the same values laid out
    both ways; calls alternate and the fastest of ``repeats`` counts (robust to a busy machine)."""
    import jax
    import jax.numpy as jnp

    kv, groups, dim = 3, 3, 64
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((rows, kv, groups, dim)), jnp.float32)
    keys = rng.standard_normal((rows, kv, dim, positions)).astype(np.float32)
    values = rng.standard_normal((rows, kv, positions, dim)).astype(np.float32)
    blocks = positions // page
    order = rng.permutation(rows * blocks)  # rows' blocks scattered over the pool
    tables = order.reshape(rows, blocks).astype(np.int32)
    pool_k = np.empty((rows * blocks, kv, dim, page), np.float32)
    pool_v = np.empty((rows * blocks, kv, page, dim), np.float32)
    for b in range(rows):
        for i in range(blocks):
            pool_k[tables[b, i]] = keys[b, :, :, i * page : (i + 1) * page]
            pool_v[tables[b, i]] = values[b, :, i * page : (i + 1) * page]
    lengths = jnp.full((rows,), positions, jnp.int32)
    scale = 1 / dim**0.5
    contiguous = jax.jit(lambda q, k, v, n: kernels.decode_attention(q, k, v, n, scale))
    paged = jax.jit(lambda q, k, v, t, n: kernels.paged_decode_attention(q, k, v, t, n, scale))
    args_c = (q, jnp.asarray(keys), jnp.asarray(values), lengths)
    args_p = (q, jnp.asarray(pool_k), jnp.asarray(pool_v), jnp.asarray(tables), lengths)
    same = bool((np.asarray(contiguous(*args_c)) == np.asarray(paged(*args_p))).all())
    best = {"paged": float("inf"), "contiguous": float("inf")}
    for _ in range(repeats):
        for name, call, args in (("paged", paged, args_p), ("contiguous", contiguous, args_c)):
            start = time.perf_counter()
            call(*args).block_until_ready()
            best[name] = min(best[name], time.perf_counter() - start)
    return {
        "rows": rows,
        "positions": positions,
        "best_ms": {k: v * 1e3 for k, v in best.items()},
        "paged_over_contiguous_time": best["paged"] / best["contiguous"],
        "bit_identical": same,
    }


def rss_gib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def memory(model, layout: str, rows: int, prompt_tokens: int, new_tokens: int) -> dict:
    """RSS of one decode batch serving ``rows`` prompts of ``prompt_tokens`` at once (the server's
    32 slots of 3073 positions): at start, peak (the kernel's high-water mark, no sampling gaps)
    and after the batch went idle. Run it in a fresh process per layout: RSS is the process's."""
    rng = np.random.default_rng(0)
    engine = Engine(model.config, model.params, model.tokenizer, kv=KVSettings(layout=layout))
    batch = engine.new_batch(slots=rows, capacity=3073)
    start = rss_gib()
    sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    requests = [Request([int(t) for t in rng.integers(10, 40000, prompt_tokens)], sampling) for _ in range(rows)]
    admitted, _ = batch.admit(requests)
    assert len(admitted) == rows
    began = time.perf_counter()
    while batch.busy:
        batch.step()
    seconds = time.perf_counter() - began
    return {
        "layout": layout,
        "rows": rows,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "rss_after_load_gib": start,
        "peak_rss_gib": rss_gib("VmHWM"),
        "idle_rss_after_gib": rss_gib(),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32", help="prompts decoded together; a comma list runs each")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--page", type=int, default=KVSettings().page, help="positions per paged-cache block")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument(
        "--attention-only", action="store_true", help="time the two attention kernels alone (no model, seconds)"
    )
    parser.add_argument(
        "--memory", metavar="LAYOUT", help="RSS of --rows 1000-token prompts at once with this layout (own process)"
    )
    args = parser.parse_args()
    try:
        KVSettings(page=args.page).check()  # a page must divide the cache's blocks
    except UserError as error:
        parser.error(str(error))
    if args.memory:
        model = afmkit.load(dtype=args.dtype)
        print(json.dumps(memory(model, args.memory, int(args.rows), 1000, args.new_tokens), indent=2))
        return
    if args.attention_only:
        result = {"attention": kernels.describe() if kernels.available() else "xla", "page": args.page, "by_rows": {}}
        for rows in args.rows.split(","):
            result["by_rows"][rows] = [attention_only(int(rows), n, args.page) for n in (256, 1024)]
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        return

    model = afmkit.load(dtype=args.dtype)
    result = {
        "new_tokens": args.new_tokens,
        "dtype": args.dtype,
        "page": args.page,
        "attention": kernels.describe(),
        "by_rows": {
            rows: measure(model, int(rows), args.new_tokens, args.repeats, args.page) for rows in args.rows.split(",")
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
