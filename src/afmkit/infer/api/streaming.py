"""Running a validated request: submit it, then answer with one JSON object or with
server-sent events. A client that disconnects cancels its job in both modes, so no slot works
on for nobody."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from afmkit.errors import UserError
from afmkit.infer.api.errors import ApiError, error_body
from afmkit.infer.api.state import ServerState
from afmkit.infer.api.validation import Generation
from afmkit.infer.engine import Request, StreamEvent
from afmkit.infer.scheduler import SchedulerClosed


class _ClientGone(Exception):
    """Put on a job's event queue when its (non-streaming) client disconnects."""


class _Job:
    """A submitted request's events, read from the event loop."""

    def __init__(self, state: ServerState, gen: Generation, adapter: Any) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

        def deliver(event: Any) -> None:  # called on the scheduler's thread
            if not loop.is_closed():  # a loop that has closed has nobody left to read the event
                with contextlib.suppress(RuntimeError):  # it may close between the check and the call
                    loop.call_soon_threadsafe(self.events.put_nowait, event)

        try:
            self.job = state.scheduler.submit(Request(gen.prompt, gen.sampling, adapter), deliver)
        except SchedulerClosed as exc:
            raise ApiError(503, str(exc), type="server_error", code="server_shutting_down") from None
        except UserError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        state.metrics.count_request(gen.model, len(gen.prompt))
        self.state, self.gen = state, gen
        self.started = time.perf_counter()
        self.count = 0
        self.id = ("chatcmpl-" if gen.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    async def next(self) -> StreamEvent:
        event = await self.events.get()
        if isinstance(event, BaseException):
            raise event
        if self.count == 0:
            self.state.metrics.first_token(time.perf_counter() - self.started)
        self.count += 1
        return event

    def usage(self) -> dict:
        prompt = len(self.gen.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": self.count, "total_tokens": prompt + self.count}


async def respond(request: Any, state: ServerState, gen: Generation, adapter: Any) -> Response:
    """Submit ``gen`` (with its resolved ``adapter``) and answer it."""
    job = _Job(state, gen, adapter)
    request.scope["afmkit.job"] = job  # for the access log line
    if gen.stream:
        return StreamingResponse(_sse(job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _complete(request, job)


async def _watch_disconnect(request: Any, job: _Job) -> None:
    """Wait for the client to go away, then cancel the job and wake its reader. The body was
    already read, so the next ASGI message is the disconnect."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server is closing the connection itself: nothing to watch
        return
    job.job.cancel()
    job.events.put_nowait(_ClientGone())


async def _complete(request: Any, job: _Job) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    texts, finish = [], None
    try:
        while finish is None:
            event = await job.next()
            texts.append(event.text)
            finish = event.finish_reason
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it
    except SchedulerClosed as exc:
        raise ApiError(503, str(exc), type="server_error", code="server_shutting_down") from None
    except Exception as exc:
        raise ApiError(500, str(exc), type="server_error", code="generation_failed") from None
    finally:
        watcher.cancel()
        job.job.cancel()  # no-op once finished; frees the slot if this handler was cancelled
    gen, text = job.gen, "".join(texts)
    if gen.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
    return JSONResponse(
        {
            "id": job.id,
            "object": "chat.completion" if gen.chat else "text_completion",
            "created": job.created,
            "model": gen.model,
            "choices": [{**choice, "logprobs": None}],
            "usage": job.usage(),
        }
    )


def _chunk(job: _Job, text: str | None, finish: str | None, *, role: bool = False, usage: dict | None = None) -> str:
    chat = job.gen.chat
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    body: dict[str, Any] = {
        "id": job.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": job.created,
        "model": job.gen.model,
        "choices": [] if usage else choices,
    }
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(job: _Job) -> AsyncIterator[str]:
    """The events of a stream; Starlette cancels this generator when the client disconnects."""
    try:
        if job.gen.chat:
            yield _chunk(job, "", None, role=True)
        finish = None
        while finish is None:
            try:
                event = await job.next()
            except Exception as exc:
                code = "server_shutting_down" if isinstance(exc, SchedulerClosed) else "generation_failed"
                yield f"data: {json.dumps(error_body(str(exc), 'server_error', code))}\n\n"
                return
            finish = event.finish_reason
            yield _chunk(job, event.text, finish)
        if job.gen.include_usage:
            yield _chunk(job, None, None, usage=job.usage())
        yield "data: [DONE]\n\n"
    finally:
        job.job.cancel()  # the client went away (or we are done): free the slot
