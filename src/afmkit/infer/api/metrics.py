"""Request counters and the Prometheus text of ``/metrics``."""

from __future__ import annotations

from typing import Any


class Metrics:
    """Counters kept by the HTTP layer (the scheduler and adapter cache keep their own)."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.errors: dict[int, int] = {}
        self.prompt_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def count_error(self, status: int) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1

    def count_request(self, model: str, prompt_tokens: int) -> None:
        self.requests[model] = self.requests.get(model, 0) + 1
        self.prompt_tokens += prompt_tokens

    def first_token(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1


def _escape(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(state: Any) -> str:
    """Every metric of ``state`` (a ``ServerState``) in the Prometheus text format."""
    scheduler, metrics, registry = state.scheduler, state.metrics, state.registry
    stats = scheduler.stats
    lines = [
        "# TYPE afmkit_queue_depth gauge",
        f"afmkit_queue_depth {scheduler.queue_depth}",
        "# TYPE afmkit_running_requests gauge",
        f"afmkit_running_requests {scheduler.running}",
        "# TYPE afmkit_requests_total counter",
        *[f'afmkit_requests_total{{model="{_escape(m)}"}} {n}' for m, n in sorted(metrics.requests.items())],
        "# TYPE afmkit_requests_completed_total counter",
        f"afmkit_requests_completed_total {stats.completed}",
        "# TYPE afmkit_requests_cancelled_total counter",
        f"afmkit_requests_cancelled_total {stats.cancelled}",
        "# TYPE afmkit_requests_failed_total counter",
        f"afmkit_requests_failed_total {stats.failed}",
        "# TYPE afmkit_http_errors_total counter",
        *[f'afmkit_http_errors_total{{status="{s}"}} {n}' for s, n in sorted(metrics.errors.items())],
        "# TYPE afmkit_prompt_tokens_total counter",
        f"afmkit_prompt_tokens_total {metrics.prompt_tokens}",
        "# TYPE afmkit_generated_tokens_total counter",
        f"afmkit_generated_tokens_total {stats.generated_tokens}",
        "# TYPE afmkit_tokens_per_second gauge",
        f"afmkit_tokens_per_second {stats.tokens_per_second():.3f}",
        "# TYPE afmkit_decode_steps_total counter",
        f"afmkit_decode_steps_total {stats.steps}",
        "# TYPE afmkit_time_to_first_token_seconds summary",
        f"afmkit_time_to_first_token_seconds_sum {metrics.ttft_sum:.6f}",
        f"afmkit_time_to_first_token_seconds_count {metrics.ttft_count}",
    ]
    if registry is not None:
        cache = registry.stats
        lines += [
            "# TYPE afmkit_adapter_cache_hits_total counter",
            f"afmkit_adapter_cache_hits_total {cache.hits}",
            "# TYPE afmkit_adapter_cache_misses_total counter",
            f"afmkit_adapter_cache_misses_total {cache.misses}",
            "# TYPE afmkit_adapter_cache_evictions_total counter",
            f"afmkit_adapter_cache_evictions_total {cache.evictions}",
            "# TYPE afmkit_adapter_cache_bytes gauge",
            f"afmkit_adapter_cache_bytes {registry.cached_bytes}",
            "# TYPE afmkit_adapter_cache_budget_bytes gauge",
            f"afmkit_adapter_cache_budget_bytes {registry.budget_bytes}",
        ]
    return "\n".join(lines) + "\n"
