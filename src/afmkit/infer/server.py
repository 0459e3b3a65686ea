"""An OpenAI-compatible HTTP server over the one engine, with LoRA adapters by name.

``afmkit serve --model M --adapters DIR`` serves:

* ``POST /v1/chat/completions`` and ``POST /v1/completions``: streaming (server-sent events)
  and not, with ``usage`` and ``finish_reason``. ``model`` is the base's served name or
  ``base:adapter`` (e.g. ``smollm2-135m-instruct:summarize``).
* ``GET /v1/models``; ``GET/POST /v1/adapters`` and ``DELETE /v1/adapters/{name}`` (load into
  and drop from the adapter cache); ``GET /health``; ``GET /metrics`` (Prometheus text).

Every request joins one running decode batch (``Scheduler``): rows for different adapters and
the bare base share each decode step. Errors are OpenAI-style ``{"error": {"message", "type",
"code", "param"}}``: 401 missing or wrong key, 404 unknown model or adapter, 400 invalid JSON or
a value out of range, 422 fields of the wrong type, 413 a body over ``max_body_bytes``.

This module assembles the app and runs it; the routes, request validation, streaming and
errors live in ``afmkit.infer.api`` (its docstring says which module holds what).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from afmkit.adapters.registry import AdapterRegistry
from afmkit.errors import UserError
from afmkit.infer.api.errors import ApiError, GuardMiddleware, access_log, install_error_handlers
from afmkit.infer.api.routes import router
from afmkit.infer.api.state import ServerLimits, ServerState
from afmkit.infer.engine import KVSettings, cache_capacity
from afmkit.infer.scheduler import Scheduler
from afmkit.infer.serve_settings import ServeSettings, check_settings

__all__ = ["ApiError", "ServerLimits", "cmd_serve", "create_app"]

GRACEFUL_SHUTDOWN_S = 10  # after SIGTERM, requests still open this long are cut off


def create_app(
    model: Any,
    *,
    served_name: str | None = None,
    adapters_dir: str | None = None,
    api_key: str | None = None,
    max_batch: int = ServeSettings.max_batch,
    cache_bytes: int = ServeSettings.cache_bytes,
    adapter_slots: int = ServeSettings.adapter_slots,
    limits: ServerLimits | None = None,
    kv: KVSettings | None = None,
) -> FastAPI:
    """The FastAPI app serving ``model`` (a ``LanguageModel``); its scheduler starts now."""
    limits = limits or ServerLimits()
    check_settings(max_batch=max_batch, adapter_slots=adapter_slots, cache_bytes=cache_bytes, adapters_dir=adapters_dir)
    registry = (
        AdapterRegistry(adapters_dir, config=model.config, params=model.params, budget_bytes=cache_bytes)
        if adapters_dir
        else None
    )
    capacity = cache_capacity(limits.max_prompt_tokens, limits.max_tokens)
    scheduler = Scheduler(
        model.engine,
        max_batch=max_batch,
        capacity=capacity,
        adapter_slots=adapter_slots,
        kv=kv or ServeSettings().kv_settings(),
    )
    state = ServerState(
        model=model,
        served_name=served_name or model.name,
        registry=registry,
        scheduler=scheduler,
        limits=limits,
        api_key=api_key,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(title="afmkit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = state
    # Kept for callers of the earlier layout (tests, benchmarks).
    app.state.scheduler, app.state.registry, app.state.metrics = scheduler, registry, state.metrics
    app.add_middleware(GuardMiddleware, state=state)
    install_error_handlers(app, state)
    app.include_router(router)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, so a port in use is a one-line error before the model
    loads (and the announced port is the one listened on)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is already in use; stop the other server or pass another --port"
            ) from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port") from None
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Run ``app`` on the bound ``sock`` until SIGINT/SIGTERM. On the signal, the scheduler is
    closed first, so every open request ends at once (a 503 or a final error event) and the
    shutdown never waits on a request that cannot finish."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.server.scheduler.close(timeout=0)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    Server(config).run(sockets=[sock])


def cmd_serve(args: Any) -> int:
    """``afmkit serve``: check the flags and the port, load the model, then serve until stopped."""
    from rich.console import Console

    import afmkit

    check_settings(
        max_batch=args.max_batch,
        adapter_slots=args.adapter_slots,
        cache_bytes=args.cache_bytes,
        adapters_dir=args.adapters,
        port=args.port,
    )
    limits = ServerLimits(
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes
    )
    kv = ServeSettings(
        kv_layout=args.kv_layout,
        kv_dtype=args.kv_dtype,
        kv_pool_tokens=args.kv_pool_tokens,
        step_tokens=args.step_tokens,
    ).kv_settings()
    kv.check()  # before the slow load
    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise UserError(f"adapter directory {args.adapters} does not exist; create it or pass another --adapters")
    mesh = None
    if getattr(args, "mesh", None):  # a bad spec fails before the model loads
        from afmkit.sharding.inference import as_mesh, row_multiple

        mesh = as_mesh(args.mesh)
        if args.max_batch % row_multiple(mesh):
            raise UserError(
                f"--max-batch {args.max_batch} does not split over mesh {args.mesh!r}, which divides the decode "
                f"batch's rows {row_multiple(mesh)} ways (data x fsdp); use a multiple of {row_multiple(mesh)}"
            )
    sock = bind(args.host, args.port)
    console = Console(stderr=True)
    with console.status(f"loading {args.model}"):
        model = afmkit.load(
            args.model, dtype=args.dtype, mesh=mesh, recovery=not args.no_recovery, activations=args.activations
        )
    app = create_app(
        model,
        served_name=args.served_name or model.name,
        adapters_dir=args.adapters,
        api_key=args.api_key,
        max_batch=args.max_batch,
        cache_bytes=args.cache_bytes,
        adapter_slots=args.adapter_slots,
        limits=limits,
        kv=kv,
    )
    if not getattr(args, "no_access_log", False):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    console.print(f"serving {args.served_name or model.name} on http://{shown}:{port}/v1")
    serve(app, sock)
    return 0
