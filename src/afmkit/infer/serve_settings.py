"""``afmkit serve``'s settings, their flags and their checks, apart from the server itself so
that building the command line (every ``afmkit`` command does) needs no web framework."""

from __future__ import annotations

import dataclasses
from typing import Any

from afmkit.errors import UserError
from afmkit.infer.api.state import ServerLimits
from afmkit.infer.engine import KVSettings


def check_settings(
    *, max_batch: int, adapter_slots: int, cache_bytes: int, adapters_dir: str | None = None, port: int | None = None
) -> None:
    """Refuse server settings that could only fail later, one line each (before any loading)."""
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1 (rows decoded together), got {max_batch}")
    if adapters_dir is not None and adapter_slots < 2:
        raise UserError(
            f"--adapter-slots must be at least 2 to serve adapters (slot 0 is the bare base), got {adapter_slots}"
        )
    if cache_bytes < 1:
        raise UserError(f"--cache-bytes must be a positive number of bytes, got {cache_bytes}")
    if port is not None and not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535 (0 picks a free port), got {port}")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """``afmkit serve``'s defaults (the request limits are ``ServerLimits``'s)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32  # rows in the running decode batch
    cache_bytes: int = 1 << 30  # the adapter registry's budget
    adapter_slots: int = 16  # adapters resident in the decode batch
    kv_layout: str = "paged"  # KV cache: a block pool with per-row block tables, or "contiguous"
    kv_dtype: str = "auto"  # "auto": the activations' dtype; "int8": 8-bit codes with per-head scales
    kv_pool_tokens: int | None = None  # the paged pool's most positions (None: max_batch x context)
    step_tokens: int = 256  # per decode step: decode rows plus prompt chunks (chunked prefill)

    def kv_settings(self) -> KVSettings:
        return KVSettings(
            layout=self.kv_layout, dtype=self.kv_dtype, pool_tokens=self.kv_pool_tokens, step_tokens=self.step_tokens
        )


def add_serve_arguments(parser: Any) -> None:
    d, limits = ServeSettings(), ServerLimits()
    parser.add_argument("--adapters", help="directory of LoRA adapters (PEFT layout), served as MODEL:NAME")
    parser.add_argument("--served-name", help="the model name clients use (default: the model's name)")
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and /metrics")
    parser.add_argument(
        "--max-batch", type=int, default=d.max_batch, help=f"rows in the running decode batch (default {d.max_batch})"
    )
    parser.add_argument(
        "--mesh",
        help="serve across devices: a mesh spec as pretrain --mesh takes, e.g. tensor=2 or data=2,tensor=4 "
        "(weights split by the trainer's sharding rules; float32/bfloat16 weights only)",
    )
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=d.cache_bytes,
        help=f"adapter cache budget in bytes (default {d.cache_bytes} = {d.cache_bytes / 2**30:g} GiB)",
    )
    parser.add_argument(
        "--adapter-slots",
        type=int,
        default=d.adapter_slots,
        help=f"adapters resident in the decode batch (default {d.adapter_slots})",
    )
    parser.add_argument(
        "--kv-layout",
        default=d.kv_layout,
        choices=("paged", "contiguous"),
        help=f"KV cache: a pool of blocks shared by the rows (memory follows the tokens in flight, prompts "
        f"prefilled in chunks between decode steps) or one full-context buffer per row (default {d.kv_layout})",
    )
    parser.add_argument(
        "--kv-dtype",
        default=d.kv_dtype,
        choices=("auto", "int8"),
        help="KV cache precision: the activations' (auto) or int8 codes with a scale per position and head "
        f"(about a quarter of fp32's memory; paged only; default {d.kv_dtype})",
    )
    parser.add_argument(
        "--kv-pool-tokens",
        type=int,
        default=d.kv_pool_tokens,
        help="most positions the paged KV pool holds; requests beyond it wait (default: max-batch x context)",
    )
    parser.add_argument(
        "--step-tokens",
        type=int,
        default=d.step_tokens,
        help=f"tokens per decode step, decode rows first, then prompt chunks (default {d.step_tokens})",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=limits.max_prompt_tokens,
        help=f"longest prompt accepted (default {limits.max_prompt_tokens})",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=limits.max_tokens,
        help=f"largest max_tokens accepted (default {limits.max_tokens}; a request without one gets "
        f"{limits.default_max_tokens})",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=limits.max_body_bytes,
        help=f"largest request body (default {limits.max_body_bytes} = {limits.max_body_bytes / 2**20:g} MiB)",
    )
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="do not print one line per request (client, route, status, model, tokens in/out, latency)",
    )
