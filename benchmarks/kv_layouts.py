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

import afmkit
from afmkit import kernels
from afmkit.infer.engine import Engine, KVSettings
from afmkit.infer.sampling import SamplingParams

LAYOUTS = ("paged", "contiguous")


def measure(model, rows: int, new_tokens: int, repeats: int) -> dict:
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
            model.config, model.params, tok, eos_ids=tok.stop_ids, max_batch=rows, kv=KVSettings(layout=layout)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32", help="prompts decoded together; a comma list runs each")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    model = afmkit.load(dtype=args.dtype)
    result = {
        "new_tokens": args.new_tokens,
        "dtype": args.dtype,
        "attention": kernels.describe(),
        "by_rows": {rows: measure(model, int(rows), args.new_tokens, args.repeats) for rows in args.rows.split(",")},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
