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
"""

from __future__ import annotations

import argparse
import asyncio
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

import afmkit
from afmkit.adapters.lora import AdapterBank, LoraConfig, random_adapter
from afmkit.adapters.peft_io import save_adapter
from afmkit.adapters.registry import AdapterRegistry
from afmkit.infer.server import ServerLimits, create_app

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
    args = parser.parse_args()

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
