"""Serving benchmark: the OpenAI-compatible server on loopback under concurrent streaming load.

Measures, on SmolLM2-135M-Instruct with rank-16 LoRA adapters on all 7 linears of all 30 layers:

* adapter cold load (PEFT directory on disk -> host memory, fingerprint and shape checks
  included; the OS page cache is warm after the first read, as on a server that has the file)
  and a cache hit, both through ``AdapterRegistry``;
* the swap of a loaded adapter into a running decode batch's adapter bank (host -> device
  slot write);
* ``--clients`` concurrent streaming clients sending ``--requests`` chat requests in two runs:
  every request on one adapter, then the same requests spread over ``--adapters`` adapters.
  A third run sends the same requests to the bare base model. Reported per run: errors, incomplete responses, p50/p99 time to first token, aggregate
  completion tokens per second; and the ratio of the two throughputs.

Prints one JSON object. Example::

    python benchmarks/serving.py --requests 64 --clients 32 --adapters 8 --max-tokens 32

``--kv-compare`` measures the KV cache instead (issue 11 §2): the paged cache (fp32 and int8)
against the contiguous one, side by side in one JSON object, each in a fresh process (RSS is a
process's) serving ``--clients`` slots with the default limits: RSS at start; time to first
token of one client alone and p95 when all clients send at the same moment; throughput of the
steady load (clients coming back for more); peak RSS while every client sends a ~1k-token
conversation at once (``--conversation-tokens``); and for int8 the greedy agreement and logit
error against fp32::

    python benchmarks/serving.py --kv-compare --clients 32 --out kv.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import httpx
import jax
import jax.numpy as jnp

import afmkit
from afmkit import runtime
from afmkit.adapters.lora import AdapterBank, LoraConfig, random_adapter
from afmkit.adapters.peft_io import save_adapter
from afmkit.adapters.registry import AdapterRegistry
from afmkit.infer.engine import Engine, KVSettings
from afmkit.infer.sampling import SamplingParams
from afmkit.infer.serve_settings import ServeSettings
from afmkit.infer.server import ServerLimits, create_app
from afmkit.model.kv_cache import PagedKVCache
from afmkit.model.transformer import forward, output_logits

QUESTIONS = [
    "Summarize the plot of Romeo and Juliet.",
    "What is the capital of France and why is it famous?",
    "Give me three tips for sleeping better.",
    "Explain what a CPU does in simple words.",
    "Write a short poem about the sea.",
    "How do vaccines work?",
    "What are the benefits of drinking water?",
    "Describe a cat to someone who has never seen one.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def time_adapter_loads(model, directory: Path, names: list[str]) -> dict:
    """Cold load (disk -> host), cache hit, and the swap into a decode batch's adapter bank."""
    cold, hits, swaps = [], [], []
    adapters = []
    for name in names:
        registry = AdapterRegistry(directory, config=model.config, params=model.params, budget_bytes=1 << 34)
        start = time.perf_counter()
        adapter = registry.get(name)
        cold.append(time.perf_counter() - start)
        adapters.append(adapter)
        for _ in range(200):
            start = time.perf_counter()
            registry.get(name)
            hits.append(time.perf_counter() - start)
    bank = AdapterBank.for_adapters(model.config, adapters[:1], slots=len(adapters) + 1)
    bank.put(1, adapters[0])  # compile the in-place slot write once
    jax.block_until_ready(bank.weights)
    for slot, adapter in enumerate(adapters, start=1):
        start = time.perf_counter()
        bank.put(slot, adapter)
        jax.block_until_ready(bank.weights)
        swaps.append(time.perf_counter() - start)
    return {
        "adapter_bytes": adapter.nbytes,
        "bank_swap_ms_median": statistics.median(swaps) * 1e3,
        "cold_load_ms_median": statistics.median(cold) * 1e3,
        "cold_load_ms_max": max(cold) * 1e3,
        "cache_hit_ms_median": statistics.median(hits) * 1e3,
        "cache_hit_ms_p99": percentile(hits, 99) * 1e3,
    }


async def one_request(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, finish, done, tokens, error = None, None, False, 0, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]["message"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if ttft is None and choice["delta"].get("content") is not None and "role" not in choice["delta"]:
                        ttft = time.perf_counter() - start
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        error = repr(exc)
    return {
        "error": error,
        "complete": done and finish in ("stop", "length"),
        "ttft": ttft,
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
    }


async def run_load(url: str, models: list[str], *, requests: int, clients: int, max_tokens: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait((models[i % len(models)], QUESTIONS[i % len(QUESTIONS)]))
    results = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            model, question = queue.get_nowait()
            results.append(await one_request(client, url, model, question, max_tokens))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results if r.get("ttft") is not None]
    tokens = sum(r.get("tokens", 0) for r in results)
    return {
        "requests": len(results),
        "errors": sum(bool(r.get("error")) for r in results),
        "incomplete": sum(not r.get("complete") for r in results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "ttft_p99_s": percentile(ttfts, 99),
        "first_error": next((r["error"] for r in results if r.get("error")), None),
    }


def combine(runs: list[dict]) -> dict:
    """One configuration over several runs: medians of throughput and p50, the worst p99."""
    if len(runs) == 1:
        return runs[0]
    return {
        "runs": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "incomplete": sum(r["incomplete"] for r in runs),
        "completion_tokens": sum(r["completion_tokens"] for r in runs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "tokens_per_s_each": [round(r["tokens_per_s"], 2) for r in runs],
        "ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in runs),
        "ttft_p99_s": max(r["ttft_p99_s"] for r in runs),
        "first_error": next((r["first_error"] for r in runs if r["first_error"]), None),
    }


class LiveServer:
    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The largest RSS seen while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def conversation(tokenizer, seed: int, target_tokens: int) -> list[dict]:
    """A multi-turn chat of about ``target_tokens`` prompt tokens, different for every seed."""
    order = [QUESTIONS[(seed * 3 + i) % len(QUESTIONS)] for i in range(len(QUESTIONS))]
    messages, turn = [], 0
    while True:
        user = f"(conversation {seed}, turn {turn}) {order[turn % len(order)]}"
        reply = " ".join(order[(turn + k) % len(order)] for k in range(1, 4))
        candidate = [*messages, {"role": "user", "content": user}]
        if len(tokenizer.encode(tokenizer.apply_chat_template(candidate))) >= target_tokens:
            return candidate
        messages = [*candidate, {"role": "assistant", "content": reply}]
        turn += 1


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    ttft, last, tokens, error = None, None, 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            error = chunk.get("error", {}).get("message") or error
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if "role" not in choice["delta"] and choice["delta"].get("content") is not None:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    last = time.perf_counter() - start
    return {"error": error, "ttft": ttft, "last": last, "tokens": tokens, "start": start}


async def conversations_at_once(url: str, bodies: list[dict]) -> dict:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(client, url, b) for b in bodies))
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results if r.get("ttft") is not None]
    tokens = sum(r.get("tokens", 0) for r in results)
    # decode: tokens after each first token, over the time from the first first token to the last token
    first = min((r["start"] - start + r["ttft"] for r in results if r.get("ttft") is not None), default=0.0)
    decode_tokens = sum(max(0, r.get("tokens", 0) - 1) for r in results)
    return {
        "requests": len(results),
        "errors": sum(bool(r.get("error")) for r in results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "decode_tokens_per_s": decode_tokens / max(wall - first, 1e-9),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "ttft_max_s": max(ttfts, default=float("nan")),
    }


def int8_accuracy(model, tokenizer, conversations: list[list[int]], max_tokens: int) -> dict:
    """Greedy agreement of int8 KV with fp32 KV (both paged), and the logit error of a decode step
    that reads ~1k quantized positions (max |difference| over the vocabulary, per row)."""
    # both paged: the engine's default layout became contiguous, and int8 KV exists only paged
    fp32 = Engine(model.config, model.params, tokenizer, eos_ids=tokenizer.stop_ids, kv=KVSettings(layout="paged"))
    int8 = Engine(
        model.config, model.params, tokenizer, eos_ids=tokenizer.stop_ids, kv=KVSettings(layout="paged", dtype="int8")
    )
    sampling = SamplingParams(max_new_tokens=max_tokens)
    want = [c.tokens for c in fp32.generate(conversations, sampling)]
    got = [c.tokens for c in int8.generate(conversations, sampling)]
    agree = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g))) for w, g in zip(want, got)]
    identical = sum(w == g for w, g in zip(want, got))
    # Logits after the prompt, which read every quantized key and value of ~1k positions.
    ids = conversations[0]
    blocks = -(-len(ids) // 16)
    first_logits = []
    for quantized in (False, True):
        cache = PagedKVCache.zeros(model.config, blocks=blocks, page=16, quantized=quantized)
        cache = dataclasses.replace(cache, tables=jnp.arange(blocks, dtype=jnp.int32)[None])

        @jax.jit
        def last_logits(params, cache):
            positions = jnp.arange(len(ids))[None]
            hidden, _ = forward(
                params, jnp.asarray([ids]), positions, cache, config=model.config, attend_len=blocks * 16
            )
            return output_logits(params, hidden[0, -1])

        first_logits.append(last_logits(model.params, cache))
    diff = abs(first_logits[0] - first_logits[1])
    return {
        "conversations": len(conversations),
        "tokens_each": max_tokens,
        "identical_rows": identical,
        "tokens_before_first_divergence_median": statistics.median(agree),
        "tokens_agreeing_fraction": sum(agree) / sum(len(w) for w in want),
        "last_prompt_position_logit_max_abs_error": float(diff.max()),
        "logit_std": float(first_logits[0].std()),
        "same_argmax": bool(first_logits[0].argmax() == first_logits[1].argmax()),
    }


def kv_worker(args) -> dict:
    """One KV configuration in this (fresh) process."""
    layout, dtype = args.kv_worker.split(":")
    model = afmkit.load(args.model)
    loaded_rss = rss_bytes()
    tokenizer = model.tokenizer
    settings = ServeSettings(max_batch=args.clients, kv_layout=layout, kv_dtype=dtype)
    app = create_app(model, max_batch=settings.max_batch, kv=settings.kv_settings())
    server = LiveServer(app)
    result: dict = {"layout": layout, "dtype": dtype, "model_loaded_rss_gib": loaded_rss / 2**30}
    short = dict(models=[model.name], max_tokens=args.max_tokens)
    try:
        time.sleep(1.0)
        result["idle_rss_at_start_gib"] = rss_bytes() / 2**30
        # Warm-up: compile the shapes of the short loads (clients arriving together, then one).
        asyncio.run(run_load(server.url, **short, requests=args.clients, clients=args.clients))
        asyncio.run(run_load(server.url, **short, requests=2, clients=1))
        singles = [asyncio.run(run_load(server.url, **short, requests=1, clients=1)) for _ in range(3)]
        result["single_client_ttft_s"] = statistics.median(r["ttft_p50_s"] for r in singles)
        # Every client sends at the same moment (the "32 clients arriving together").
        together = asyncio.run(run_load(server.url, **short, requests=args.clients, clients=args.clients))
        result["together"] = together
        result["p95_ttft_over_single"] = together["ttft_p95_s"] / result["single_client_ttft_s"]
        # Steady load: clients coming back for more (the default benchmark's runs).
        result["steady"] = asyncio.run(run_load(server.url, **short, requests=2 * args.clients, clients=args.clients))
        # Memory: every client a ~1k-token conversation at once (one run: compiles included).
        bodies = []
        for seed in range(args.clients):
            messages = conversation(tokenizer, seed, args.conversation_tokens)
            bodies.append({"model": model.name, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
        with PeakRss() as peak:
            result["conversations"] = asyncio.run(conversations_at_once(server.url, bodies))
        result["conversations"]["prompt_tokens_mean"] = statistics.mean(
            len(tokenizer.encode(tokenizer.apply_chat_template(b["messages"]))) for b in bodies
        )
        result["peak_rss_gib"] = peak.peak / 2**30
        # The kernel's high-water mark over the process's life (no sampling gaps; includes warm-up).
        result["peak_rss_hwm_gib"] = rss_bytes("VmHWM") / 2**30
        time.sleep(1.0)
        result["idle_rss_after_gib"] = rss_bytes() / 2**30
    finally:
        server.close()
        app.state.scheduler.close()
    if dtype == "int8":
        ids = [
            tokenizer.encode(tokenizer.apply_chat_template(conversation(tokenizer, s, args.conversation_tokens)))
            for s in range(4)
        ]
        result["int8_vs_fp32"] = int8_accuracy(model, tokenizer, ids, 32)
    return result


def kv_compare(args) -> dict:
    """Each configuration in a fresh process, contiguous first; then the ratios side by side."""
    import subprocess

    configs = ["contiguous:auto", "paged:auto", "paged:int8"]
    results = {}
    for i, config in enumerate(configs):
        if config not in args.kv_configs.split(","):
            results[config] = {"error": "not run (--kv-configs)"}
            continue
        if sys.stderr.isatty():  # progress for a person watching; a pipe or a log gets the JSON only
            print(f"[{i + 1}/{len(configs)}] {config} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--kv-worker", config, "--clients", str(args.clients),
                   "--max-tokens", str(args.max_tokens), "--conversation-tokens", str(args.conversation_tokens),
                   "--model", args.model]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            # A negative code is a signal: -9 is usually the kernel's out-of-memory killer.
            cause = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
            results[config] = {"error": f"{cause}: {done.stderr[-2000:]}"}
            continue
        results[config] = json.loads(done.stdout.strip().splitlines()[-1])
    base, paged, int8 = (results[c] for c in configs)

    def ratio(a: dict, b: dict, *path: str) -> float | None:
        try:
            for key in path[:-1]:
                a, b = a[key], b[key]
            return a[path[-1]] / b[path[-1]]
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    side_by_side = {}
    for name, path in {
        "idle_rss_at_start_gib": ("idle_rss_at_start_gib",),
        "peak_rss_gib": ("peak_rss_gib",),
        "single_client_ttft_s": ("single_client_ttft_s",),
        "together_ttft_p95_s": ("together", "ttft_p95_s"),
        "together_tokens_per_s": ("together", "tokens_per_s"),
        "steady_tokens_per_s": ("steady", "tokens_per_s"),
        "conversations_tokens_per_s": ("conversations", "tokens_per_s"),
    }.items():
        side_by_side[name] = {
            "paged_over_contiguous": ratio(paged, base, *path),
            "int8_over_contiguous": ratio(int8, base, *path),
        }
    targets = {}
    for label, r in (("paged", paged), ("int8", int8)):
        if "error" in r:
            continue
        targets[label] = {
            "idle_rss_under_1gib": r["idle_rss_at_start_gib"] < 1.0,
            "peak_rss_under_2gib": r["peak_rss_gib"] < 2.0,
            "p95_ttft_at_most_3x_single": r["p95_ttft_over_single"] <= 3.0,
            # None when the contiguous baseline did not run
            "steady_throughput_not_below_contiguous": None
            if (steady := ratio(r, base, "steady", "tokens_per_s")) is None
            else steady >= 1.0,
        }
    return {"model": args.model, "cpu_count": os.cpu_count(), "clients": args.clients, "max_tokens": args.max_tokens,
            "conversation_tokens": args.conversation_tokens, "configs": results, "ratios": side_by_side,
            "targets": targets}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=64, help="requests per run (default 64)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    parser.add_argument("--adapters", type=int, default=8, help="adapters in the mixed run (default 8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default 32)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=1, help="single/mixed runs alternate this many times; medians reported"
    )
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--kv-compare", action="store_true", help="compare KV caches instead (see above)")
    parser.add_argument("--kv-worker", help=argparse.SUPPRESS)  # LAYOUT:DTYPE, one configuration
    parser.add_argument("--conversation-tokens", type=int, default=1000, help="prompt tokens per conversation")
    parser.add_argument(
        "--kv-configs",
        default="contiguous:auto,paged:auto,paged:int8",
        help="with --kv-compare: the LAYOUT:DTYPE configurations to run (default: all three)",
    )
    args = parser.parse_args()
    runtime.return_freed_memory()  # as `afmkit serve` does (AFMKIT_MALLOC=default to compare glibc's defaults)
    if args.kv_worker:
        print(json.dumps(kv_worker(args)))
        return 0
    if args.kv_compare:
        result = kv_compare(args)
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0

    model = afmkit.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        names = [f"task{i}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            adapter = random_adapter(model.config, LoraConfig(rank=args.rank), jax.random.PRNGKey(i), name=name)
            save_adapter(directory / name, adapter, config=model.config, params=model.params, base_name=model.name)
        loads = time_adapter_loads(model, directory, names)
        app = create_app(
            model,
            adapters_dir=str(directory),
            max_batch=args.clients,
            adapter_slots=args.adapters + 1,
            limits=ServerLimits(max_prompt_tokens=256, max_tokens=args.max_tokens),
        )
        server = LiveServer(app)
        try:
            single = [f"{model.name}:{names[0]}"]
            mixed = [f"{model.name}:{n}" for n in names]
            kwargs = dict(requests=args.requests, clients=args.clients, max_tokens=args.max_tokens)
            # Warm-up: compile every batch and prompt bucket the runs will meet.
            asyncio.run(run_load(server.url, mixed, **{**kwargs, "requests": args.clients}))
            asyncio.run(run_load(server.url, single, **{**kwargs, "requests": args.clients}))
            # Alternate the order, so drift in the machine's load does not favour one configuration.
            runs: dict[str, list[dict]] = {"single": [], "mixed": []}
            for r in range(args.rounds):
                for label in ("single", "mixed") if r % 2 == 0 else ("mixed", "single"):
                    runs[label].append(
                        asyncio.run(run_load(server.url, {"single": single, "mixed": mixed}[label], **kwargs))
                    )
            one, many = combine(runs["single"]), combine(runs["mixed"])
            # The bare base model (every row in bank slot 0): the price of LoRA itself.
            asyncio.run(run_load(server.url, [model.name], **{**kwargs, "requests": args.clients}))
            base = asyncio.run(run_load(server.url, [model.name], **kwargs))
        finally:
            server.close()
            app.state.scheduler.close()
    result = {
        "model": model.name,
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "clients": args.clients,
        "requests_per_run": args.requests,
        "max_tokens": args.max_tokens,
        "rank": args.rank,
        "adapter_load": loads,
        "single_adapter": one,
        "mixed_adapters": {"adapters": args.adapters, **many},
        "mixed_over_single_throughput": many["tokens_per_s"] / one["tokens_per_s"],
        "base_model_no_adapter": base,
        "single_adapter_over_base_throughput": one["tokens_per_s"] / base["tokens_per_s"],
        "targets": {
            "no_errors": one["errors"] == 0 and many["errors"] == 0,
            "all_complete": one["incomplete"] == 0 and many["incomplete"] == 0,
            "mixed_throughput_at_least_80pct": many["tokens_per_s"] >= 0.8 * one["tokens_per_s"],
            "cold_load_under_50ms": loads["cold_load_ms_median"] < 50,
            "cache_hit_under_1ms": loads["cache_hit_ms_median"] < 1,
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
