"""Engine decode throughput with the paged and the contiguous KV cache, side by side.

Both engines share one model and one process and run in turn (after a warm-up that compiles
every shape), so the ratio is fair on a busy machine; the best of ``--repeats`` is reported.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import afmkit
from afmkit.infer.engine import Engine, KVSettings
from afmkit.infer.sampling import SamplingParams

LAYOUTS = ("paged", "contiguous")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="prompts decoded together")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="int4")
    args = parser.parse_args()

    model = afmkit.load(dtype=args.dtype)
    tok = model.tokenizer
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": f"Write a story about the number {i}."}], add_generation_prompt=True
            )
        )
        for i in range(args.rows)
    ]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    engines = {
        layout: Engine(
            model.config, model.params, tok, eos_ids=tok.stop_ids, max_batch=args.rows, kv=KVSettings(layout=layout)
        )
        for layout in LAYOUTS
    }
    for engine in engines.values():
        engine.generate(prompts, sampling)  # compile every shape first
    runs: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    for _ in range(args.repeats):
        for layout, engine in engines.items():
            start = time.perf_counter()
            completions = engine.generate(prompts, sampling)
            seconds = time.perf_counter() - start
            runs[layout].append(sum(len(c.tokens) for c in completions) / seconds)
    best = {layout: max(values) for layout, values in runs.items()}
    print(
        json.dumps(
            {
                "rows": args.rows,
                "new_tokens": args.new_tokens,
                "dtype": args.dtype,
                "tokens_per_second": runs,
                "best": best,
                "paged_over_contiguous": best["paged"] / best["contiguous"],
            }
        )
    )


if __name__ == "__main__":
    main()
