"""Errors in the OpenAI shape: ``{"error": {"message", "type", "code", "param"}}``.

Routes raise ``ApiError``; the handlers installed here answer every failure (an ``ApiError``,
an unknown route, a wrong method, and, as a last resort, any unexpected exception) with that
shape, count it in the error metric and keep the connection alive.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("afmkit.server")


class ApiError(Exception):
    """A request the server answers with ``status`` and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def error_response(state: Any, exc: ApiError) -> JSONResponse:
    """``exc`` as a JSON response, counted in ``afmkit_http_errors_total``."""
    state.metrics.count_error(exc.status)
    return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status)


def too_large(max_body_bytes: int) -> ApiError:
    return ApiError(
        413, f"the request body exceeds {max_body_bytes} bytes; send a smaller request", code="request_too_large"
    )


def install_error_handlers(app: FastAPI, state: Any) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return error_response(state, exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = ApiError(404, f"no route {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            error = ApiError(exc.status_code, str(exc.detail))
        return error_response(state, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(state, ApiError(422, f"{where}: {first.get('msg', 'invalid')}", code="invalid_type"))


access_log = logging.getLogger("afmkit.access")


def _log_access(scope: dict, status: int, seconds: float) -> None:
    """One line per request: client, method and path, status, model, tokens in/out, latency
    (to the last byte; for a stream, its end). ``streaming`` leaves the job in the scope."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    job = scope.get("afmkit.job")
    model, tokens_in, tokens_out = (job.gen.model, len(job.gen.prompt), job.count) if job else ("-", 0, 0)
    client = scope.get("client") or ("-", 0)
    access_log.info(
        '%s "%s %s" %d model=%s tokens_in=%d tokens_out=%d %.3fs',
        client[0],
        scope.get("method"),
        scope.get("path"),
        status or 499,  # no response started: the client went away first
        model,
        tokens_in,
        tokens_out,
        seconds,
    )


PUBLIC_PATHS = ("/health", "/metrics")  # everything else needs the API key when one is set


class GuardMiddleware:
    """Pure ASGI middleware (it never wraps ``receive``, so handlers still see disconnects):

    * with an API key, every path but ``/health`` and ``/metrics`` needs ``Authorization: Bearer
      KEY`` (``/openapi.json`` included);
    * a ``Content-Length`` over the body limit is refused before the body is read;
    * an exception nothing else handled becomes a JSON 500 (logged with its traceback), not a
      plain-text 500 that also drops the keep-alive connection.
    """

    def __init__(self, app: Any, *, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 0

        async def tracking_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(self.state, refusal)(scope, receive, tracking_send)
                return
            try:
                await self.app(scope, receive, tracking_send)
            except Exception as exc:
                log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
                if status:  # a stream already under way: nothing more can be said to this client
                    return
                error = ApiError(
                    500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error"
                )
                await error_response(self.state, error)(scope, receive, tracking_send)
        finally:
            _log_access(scope, status, time.perf_counter() - started)

    def _refusal(self, scope: dict) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.state.api_key
        if key and scope.get("path") not in PUBLIC_PATHS:
            header = headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                what = "missing" if not header else "incorrect"
                return ApiError(
                    401,
                    f"{what} API key; send 'Authorization: Bearer <key>' with the server's --api-key",
                    type="authentication_error",
                    code="invalid_api_key",
                )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.state.limits.max_body_bytes:
            return too_large(self.state.limits.max_body_bytes)
        return None
