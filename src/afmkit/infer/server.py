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
a request over the limits, 422 fields of the wrong type, 413 a body over ``max_body_bytes``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from afmkit.adapters.registry import AdapterBudgetError, AdapterNotFoundError, AdapterRegistry
from afmkit.errors import CorruptFileError, UserError
from afmkit.infer.engine import Request, StreamEvent, cache_capacity
from afmkit.infer.sampling import SamplingParams
from afmkit.infer.scheduler import Scheduler


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerLimits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024  # most tokens one request may generate
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code


def _error_body(status: int, message: str, type: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.errors: dict[int, int] = {}
        self.prompt_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0


def create_app(
    model: Any,
    *,
    served_name: str | None = None,
    adapters_dir: str | None = None,
    api_key: str | None = None,
    max_batch: int = 32,
    cache_bytes: int = 1 << 30,
    adapter_slots: int = 16,
    limits: ServerLimits = ServerLimits(),
) -> Any:
    """The FastAPI app serving ``model`` (a ``LanguageModel``); its scheduler starts now."""
    served_name = served_name or model.name
    registry = (
        AdapterRegistry(adapters_dir, config=model.config, params=model.params, budget_bytes=cache_bytes)
        if adapters_dir
        else None
    )
    capacity = cache_capacity(limits.max_prompt_tokens, limits.max_tokens)
    scheduler = Scheduler(model.engine, max_batch=max_batch, capacity=capacity, adapter_slots=adapter_slots)
    metrics = Metrics()
    app = FastAPI(title="afmkit", docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.registry, app.state.metrics = scheduler, registry, metrics

    @app.on_event("shutdown")
    def _shutdown() -> None:
        scheduler.close()

    def error_response(exc: ApiError) -> JSONResponse:
        metrics.errors[exc.status] = metrics.errors.get(exc.status, 0) + 1
        return JSONResponse(_error_body(exc.status, exc.message, exc.type, exc.code), status_code=exc.status)

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(404)
    async def _not_found(request: HttpRequest, _: Exception) -> JSONResponse:
        return error_response(ApiError(404, f"no route {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: HttpRequest, _: Exception) -> JSONResponse:
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next: Any) -> Any:
        path = request.url.path
        if api_key and path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                what = "missing" if not header else "incorrect"
                return error_response(
                    ApiError(
                        401,
                        f"{what} API key; send 'Authorization: Bearer <key>' with the server's --api-key",
                        type="authentication_error",
                        code="invalid_api_key",
                    )
                )
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            return error_response(_too_large(limits))
        return await call_next(request)

    async def read_json(request: HttpRequest) -> dict[str, Any]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise _too_large(limits)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return data

    def resolve_model(name: Any) -> Any:
        """The adapter a model name asks for (None: the base); 404 for unknown names."""
        if not isinstance(name, str) or not name:
            raise ApiError(422, "'model' is required: a string naming the model", code="invalid_type")
        base, sep, adapter_name = name.partition(":")
        if base != served_name:
            raise ApiError(
                404, f"the model {name!r} does not exist; this server serves {served_name!r}", code="model_not_found"
            )
        if not sep:
            return None
        if registry is None:
            raise ApiError(
                404,
                f"no adapters are served here (start with --adapters DIR); asked for {name!r}",
                code="model_not_found",
            )
        return load_named_adapter(adapter_name)

    def load_named_adapter(name: str) -> Any:
        try:
            return registry.get(name)
        except AdapterNotFoundError as exc:
            raise ApiError(404, str(exc), code="adapter_not_found") from None
        except AdapterBudgetError as exc:
            raise ApiError(507, str(exc), type="server_error", code="adapter_cache_too_small") from None
        except CorruptFileError as exc:
            raise ApiError(500, str(exc), type="server_error", code="adapter_corrupt") from None
        except UserError as exc:
            code = "invalid_adapter_name" if "invalid adapter name" in str(exc) else "adapter_incompatible"
            raise ApiError(400, str(exc), code=code) from None

    def sampling_from(data: dict[str, Any]) -> SamplingParams:
        def number(key: str, default: Any, kind: type) -> Any:
            value = data.get(key, default)
            if value is None:
                return default
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (kind is int and not isinstance(value, int))
            ):
                raise ApiError(
                    422, f"'{key}' must be {'an integer' if kind is int else 'a number'}", code="invalid_type"
                )
            return kind(value)

        max_tokens = number("max_completion_tokens", None, int) or number("max_tokens", limits.default_max_tokens, int)
        if max_tokens < 1 or max_tokens > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                code="invalid_max_tokens",
            )
        stop = data.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ApiError(422, "'stop' must be a non-empty string or a list of up to 4 of them", code="invalid_type")
        if number("n", 1, int) != 1:
            raise ApiError(400, "only n=1 is supported", code="unsupported_n")
        seed = number("seed", 0, int) % (2**32)
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=number("temperature", 1.0, float),
                top_p=number("top_p", 1.0, float),
                top_k=number("top_k", 0, int),
                seed=seed,
                stop=tuple(stop),
            )
        except UserError as exc:
            raise ApiError(400, str(exc), code="invalid_sampling") from None

    def check_prompt(ids: list[int]) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", code="empty_prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}",
                code="context_length_exceeded",
            )

    async def run(
        request: HttpRequest, data: dict[str, Any], ids: list[int], *, chat: bool
    ) -> JSONResponse | StreamingResponse:
        name = data.get("model")
        # The request holds its adapter until it ends, even if the cache evicts it meanwhile;
        # a cold load reads the disk, so it runs off the event loop.
        adapter = await asyncio.to_thread(resolve_model, name)
        sampling = sampling_from(data)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(422, "'stream' must be true or false", code="invalid_type")
        check_prompt(ids)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = scheduler.submit(
                Request(ids, sampling, adapter), lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
            )
        except UserError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        metrics.requests[name] = metrics.requests.get(name, 0) + 1
        metrics.prompt_tokens += len(ids)
        started = time.perf_counter()
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        async def next_event() -> StreamEvent:
            event = await events.get()
            if isinstance(event, BaseException):
                raise event
            return event

        if not stream:
            texts, count, finish = [], 0, None
            try:
                while finish is None:
                    event = await next_event()
                    if count == 0:
                        metrics.ttft_sum += time.perf_counter() - started
                        metrics.ttft_count += 1
                    texts.append(event.text)
                    count += 1
                    finish = event.finish_reason
            finally:
                job.cancel()  # no-op once finished; frees the slot if this handler was cancelled
            text = "".join(texts)
            usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            )
            return JSONResponse(
                {
                    "id": request_id,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": name,
                    "choices": [choice],
                    "usage": usage,
                }
            )

        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))

        def chunk(delta_text: str | None, finish: str | None, *, role: bool = False, usage: dict | None = None) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            else:
                choices = [{"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}]
            body = {
                "id": request_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": name,
                "choices": [] if usage else choices,
            }
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse() -> AsyncIterator[str]:
            count = 0
            try:
                if chat:
                    yield chunk("", None, role=True)
                finish = None
                while finish is None:
                    try:
                        event = await next_event()
                    except Exception as exc:
                        yield f"data: {json.dumps(_error_body(500, str(exc), 'server_error', 'generation_failed'))}\n\n"
                        return
                    if count == 0:
                        metrics.ttft_sum += time.perf_counter() - started
                        metrics.ttft_count += 1
                    count += 1
                    finish = event.finish_reason
                    yield chunk(event.text, finish)
                if include_usage:
                    usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
                    yield chunk(None, None, usage=usage)
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # the client went away (or we are done): free the slot

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        data = await read_json(request)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(422, "'messages' must be a non-empty list of {role, content} objects", code="invalid_type")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(422, "each message needs a 'role' string and 'content'", code="invalid_type")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise ApiError(422, "message 'content' must be a string or a list of text parts", code="invalid_type")
            clean.append({"role": m["role"], "content": content})
        try:
            prompt = model.tokenizer.apply_chat_template(clean)
        except UserError as exc:
            raise ApiError(400, str(exc), code="invalid_messages") from None
        return await run(request, data, model.tokenizer.encode(prompt), chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        data = await read_json(request)
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = model.tokenizer.encode(prompt)
        elif (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            if not all(0 <= t < model.config.vocab_size for t in prompt):
                raise ApiError(400, f"token ids must lie in [0, {model.config.vocab_size})", code="invalid_prompt")
            ids = list(prompt)
        else:
            raise ApiError(422, "'prompt' must be a string or a list of token ids (one prompt)", code="invalid_type")
        return await run(request, data, ids, chat=False)

    @app.get("/v1/models")
    async def list_models() -> dict:
        created = int(time.time())
        names = [served_name] + ([f"{served_name}:{a}" for a in registry.names()] if registry else [])
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "afmkit"} for n in names],
        }

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        if registry is None:
            return {"object": "list", "data": []}
        cached = set(registry.cached())
        return {
            "object": "list",
            "data": [{"name": n, "model": f"{served_name}:{n}", "loaded": n in cached} for n in registry.names()],
        }

    @app.post("/v1/adapters")
    async def load_adapter(request: HttpRequest) -> dict:
        data = await read_json(request)
        name = data.get("name")
        if not isinstance(name, str):
            raise ApiError(422, "'name' must be the adapter's name (a string)", code="invalid_type")
        if registry is None:
            raise ApiError(404, "no adapters are served here (start with --adapters DIR)", code="adapter_not_found")
        adapter = await asyncio.to_thread(load_named_adapter, name)
        return {"name": name, "model": f"{served_name}:{name}", "loaded": True, "bytes": adapter.nbytes}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        if registry is None:
            raise ApiError(404, "no adapters are served here", code="adapter_not_found")
        try:
            registry.path(name)
            was_loaded = registry.unload(name)
        except AdapterNotFoundError as exc:
            raise ApiError(404, str(exc), code="adapter_not_found") from None
        except UserError as exc:
            raise ApiError(400, str(exc), code="invalid_adapter_name") from None
        return {"name": name, "loaded": False, "was_loaded": was_loaded}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served_name, "running": scheduler.running, "queued": scheduler.queue_depth}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        stats = scheduler.stats
        lines = [
            "# TYPE afmkit_queue_depth gauge",
            f"afmkit_queue_depth {scheduler.queue_depth}",
            "# TYPE afmkit_running_requests gauge",
            f"afmkit_running_requests {scheduler.running}",
            "# TYPE afmkit_requests_total counter",
            *[f'afmkit_requests_total{{model="{m}"}} {n}' for m, n in sorted(metrics.requests.items())],
            "# TYPE afmkit_requests_completed_total counter",
            f"afmkit_requests_completed_total {stats.completed}",
            "# TYPE afmkit_requests_cancelled_total counter",
            f"afmkit_requests_cancelled_total {stats.cancelled}",
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
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def _too_large(limits: ServerLimits) -> ApiError:
    return ApiError(
        413, f"the request body exceeds {limits.max_body_bytes} bytes; send a smaller request", code="request_too_large"
    )


def cmd_serve(args: Any) -> int:
    """``afmkit serve``: load the model, then serve until interrupted."""
    import uvicorn
    from rich.console import Console

    import afmkit

    console = Console(stderr=True)
    with console.status(f"loading {args.model}"):
        model = afmkit.load(args.model, dtype=args.dtype)
    app = create_app(
        model,
        served_name=args.served_name or model.name,
        adapters_dir=args.adapters,
        api_key=args.api_key,
        max_batch=args.max_batch,
        cache_bytes=args.cache_bytes,
        adapter_slots=args.adapter_slots,
        limits=ServerLimits(
            max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes
        ),
    )
    console.print(f"serving {args.served_name or model.name} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_serve_arguments(parser: Any) -> None:
    parser.add_argument("--adapters", help="directory of LoRA adapters (PEFT layout), served as MODEL:NAME")
    parser.add_argument("--served-name", help="the model name clients use (default: the model's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    parser.add_argument("--max-batch", type=int, default=32, help="rows in the running decode batch (default 32)")
    parser.add_argument(
        "--cache-bytes", type=int, default=1 << 30, help="adapter cache budget in bytes (default 1 GiB)"
    )
    parser.add_argument(
        "--adapter-slots", type=int, default=16, help="adapters resident in the decode batch (default 16)"
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted (default 2048)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens accepted (default 1024)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
