"""The endpoints. Each reads the ``ServerState`` from ``request.app.state.server``; generation
goes validation (``validation.parse_generation``) -> adapter by name -> ``streaming.respond``."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from afmkit.adapters.lora import LoraAdapter
from afmkit.adapters.registry import AdapterBudgetError, AdapterNotFoundError
from afmkit.errors import CorruptFileError, UserError
from afmkit.infer.api.errors import ApiError, log
from afmkit.infer.api.metrics import prometheus_text
from afmkit.infer.api.state import ServerState, server_state
from afmkit.infer.api.streaming import respond
from afmkit.infer.api.validation import parse_generation, read_json

router = APIRouter()


# -- adapters by name -------------------------------------------------------------------------
def _no_adapters(what: str) -> ApiError:
    return ApiError(404, f"no adapters are served here (start with --adapters DIR){what}", code="adapter_not_found")


def load_named_adapter(state: ServerState, name: str) -> LoraAdapter:
    """The adapter ``name`` from the registry (disk on a miss: call it off the event loop)."""
    if state.registry is None:
        raise _no_adapters("")
    try:
        return state.registry.get(name)
    except AdapterNotFoundError as exc:
        raise ApiError(404, str(exc), code="adapter_not_found") from None
    except AdapterBudgetError as exc:
        raise ApiError(507, str(exc), type="server_error", code="adapter_cache_too_small") from None
    except CorruptFileError as exc:
        log.error("adapter %r: %s", name, exc)
        # The full message (with the server's paths) goes to the log; the client sees it with
        # paths relative to the adapter directory.
        message = str(exc).replace(f"{state.registry.directory.resolve()}/", "")
        message = message.replace(f"{state.registry.directory}/", "")
        raise ApiError(500, message, type="server_error", code="adapter_corrupt") from None
    except UserError as exc:
        code = "invalid_adapter_name" if "invalid adapter name" in str(exc) else "adapter_incompatible"
        raise ApiError(400, str(exc), code=code) from None


def resolve_model(state: ServerState, name: str) -> LoraAdapter | None:
    """The adapter a model name asks for (the bare name: the model's own default adapter, e.g. a
    compressed model's recovery adapter, or None); 404 for unknown names."""
    base, sep, adapter_name = name.partition(":")
    if base != state.served_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {state.served_name!r}",
            code="model_not_found",
            param="model",
        )
    if not sep:
        return state.model.adapter
    if state.registry is None:
        raise _no_adapters(f"; asked for {name!r}")
    return load_named_adapter(state, adapter_name)


# -- generation -------------------------------------------------------------------------------
async def _generate(request: HttpRequest, *, chat: bool) -> Response:
    state = server_state(request)
    data = await read_json(request, state.limits)
    gen = parse_generation(data, chat=chat, model=state.model, limits=state.limits)
    # The request holds its adapter until it ends, even if the cache evicts it meanwhile; a
    # cold load reads the disk, so it runs off the event loop.
    adapter = await asyncio.to_thread(resolve_model, state, gen.model)
    return await respond(request, state, gen, adapter)


@router.post("/v1/chat/completions")
async def chat_completions(request: HttpRequest) -> Response:
    return await _generate(request, chat=True)


@router.post("/v1/completions")
async def completions(request: HttpRequest) -> Response:
    return await _generate(request, chat=False)


# -- models and adapters ----------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: HttpRequest) -> dict:
    state = server_state(request)
    created = int(time.time())
    names = [state.served_name]
    if state.registry is not None:
        names += [f"{state.served_name}:{a}" for a in state.registry.names()]
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": created, "owned_by": "afmkit"} for n in names],
    }


@router.get("/v1/adapters")
async def list_adapters(request: HttpRequest) -> dict:
    state = server_state(request)
    if state.registry is None:
        return {"object": "list", "data": []}
    cached = set(state.registry.cached())
    return {
        "object": "list",
        "data": [
            {"name": n, "model": f"{state.served_name}:{n}", "loaded": n in cached} for n in state.registry.names()
        ],
    }


@router.post("/v1/adapters")
async def load_adapter(request: HttpRequest) -> dict:
    state = server_state(request)
    data = await read_json(request, state.limits)
    name = data.get("name")
    if not isinstance(name, str):
        raise ApiError(422, "'name' must be the adapter's name (a string)", code="invalid_type", param="name")
    adapter = await asyncio.to_thread(load_named_adapter, state, name)
    return {"name": name, "model": f"{state.served_name}:{name}", "loaded": True, "bytes": adapter.nbytes}


@router.delete("/v1/adapters/{name}")
async def unload_adapter(request: HttpRequest, name: str) -> dict:
    state = server_state(request)
    if state.registry is None:
        raise _no_adapters("")
    try:
        state.registry.path(name)
        was_loaded = state.registry.unload(name)
    except AdapterNotFoundError as exc:
        raise ApiError(404, str(exc), code="adapter_not_found") from None
    except UserError as exc:
        raise ApiError(400, str(exc), code="invalid_adapter_name") from None
    return {"name": name, "loaded": False, "was_loaded": was_loaded}


# -- operations -------------------------------------------------------------------------------
@router.get("/health")
async def health(request: HttpRequest) -> JSONResponse:
    """``running``/``queued`` count every job the scheduler holds; 503 once its thread is gone."""
    state = server_state(request)
    scheduler = state.scheduler
    ok = scheduler.alive
    body = {
        "status": "ok" if ok else "unavailable",
        "model": state.served_name,
        "running": scheduler.running,
        "queued": scheduler.queue_depth,
        "failed": scheduler.stats.failed,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: HttpRequest) -> PlainTextResponse:
    return PlainTextResponse(prometheus_text(server_state(request)), media_type="text/plain; version=0.0.4")
