"""What unrolling the layers costs: one forward compiled as a Python loop over layers (as the
engine does today) against the same layers stacked and run by ``lax.scan``.

Issue 13's memory target is far from met, and docs/compression.md puts about 290 MiB of the
engine's share in compiled programs, each holding 30 copies of a layer's code. This measures that
guess before anything is rebuilt on it: for each variant, in a fresh process, the compile time,
the serialized program's size, RSS after each compile (without afmkit's persistent compilation
cache), and the run time (median of ``--repeats``) of one forward per ``--tokens`` count, batch 1,
without a cache (the scoring path: no KV-cache layout is involved; a count of 1 is a decode-sized
step). Both variants must give the same last hidden state (the same sums, so the same bits are
expected; the report gives the largest difference).

    python benchmarks/layer_scan.py --model smollm2-135m-instruct --dtype int4 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from generation import peak_rss_mib, rss_mib  # this folder's benchmark

VARIANTS = ("unrolled", "scan")


def worker(variant: str, model_name: str, dtype: str, token_counts: list[int], repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.serialize_executable import serialize

    import afmkit
    from afmkit.model.transformer import decoder_layer, forward, rms_norm

    model = afmkit.load(model_name, dtype=dtype)
    config, params = model.config, model.params
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, max(token_counts))), jnp.int32)
    positions = jnp.arange(max(token_counts), dtype=jnp.int32)[None]
    masks = {"segment_ids": None, "branch_ids": None}

    if variant == "unrolled":

        def run(params, ids, positions):
            return forward(params, ids, positions, None, config=config)[0]

        args = (params, ids, positions)
    else:
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params["layers"])
        scan_params = {**params, "layers": stacked}

        def run(params, ids, positions):
            from afmkit.model.transformer import embed_lookup

            x = embed_lookup(params["embed"], ids).astype(jnp.float32)

            def body(x, layer):
                return decoder_layer(x, layer, positions, None, None, config, 0, masks, None, 0)[0], None

            x, _ = jax.lax.scan(body, x, params["layers"])
            return rms_norm(x, params["final_norm"], config.norm_eps)

        args = (scan_params, ids, positions)
    jax.block_until_ready(args)
    rss_start = rss_mib()
    programs = []
    for n in token_counts:
        ids_n, positions_n = args[1][:, :n], args[2][:, :n]
        start = time.perf_counter()
        compiled = jax.jit(run).lower(args[0], ids_n, positions_n).compile()
        compile_s = time.perf_counter() - start
        rss = rss_mib()
        out = compiled(args[0], ids_n, positions_n).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            compiled(args[0], ids_n, positions_n).block_until_ready()
            times.append(time.perf_counter() - start)
        programs.append(
            {
                "tokens": n,
                "compile_s": round(compile_s, 2),
                "serialized_mib": round(len(serialize(compiled)[0]) / 2**20, 2),
                "rss_after_compile_mib": round(rss, 1),
                "run_s_median": round(statistics.median(times), 4),
            }
        )
        if n == token_counts[0]:
            hidden = np.asarray(out[0, -1]).tolist()
    later = [b["rss_after_compile_mib"] - a["rss_after_compile_mib"] for a, b in itertools.pairwise(programs)]
    return {
        "variant": variant,
        "rss_before_compiling_mib": round(rss_start, 1),
        "rss_added_by_first_program_mib": round(programs[0]["rss_after_compile_mib"] - rss_start, 1),
        "rss_added_per_later_program_mib": round(statistics.mean(later), 1) if later else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "programs": programs,
        "hidden": hidden,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--tokens", default="512,256,128,1", help="one program per count (default 512,256,128,1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    token_counts = [int(n) for n in args.tokens.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.dtype, token_counts, args.repeats)))
        return 0

    import numpy as np

    rows = []
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--dtype", args.dtype]
        command += ["--tokens", args.tokens, "--repeats", str(args.repeats)]
        # Compiled afresh: programs read from afmkit's persistent cache hold more (docs/compression.md).
        env = {**os.environ, "AFMKIT_NO_XLA_CACHE": "1"}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode:
            raise SystemExit(f"the {variant} worker failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    hidden = [np.asarray(row.pop("hidden")) for row in rows]
    unrolled, scan = rows
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "token_counts": token_counts,
        "machine": platform.processor() or platform.machine(),
        "variants": rows,
        "max_abs_hidden_difference": float(np.abs(hidden[0] - hidden[1]).max()),
        "hidden_std": float(hidden[0].std()),
        "ratios_scan_over_unrolled": [
            {"tokens": a["tokens"]}
            | {key: round(b[key] / a[key], 3) for key in ("compile_s", "serialized_mib", "run_s_median")}
            for a, b in zip(unrolled["programs"], scan["programs"])
        ],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as file:
            file.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
