"""The one validation layer of ``/v1/chat/completions`` and ``/v1/completions``.

``parse_generation`` turns a request body into a ``Generation`` (prompt ids, sampling, stream
options) or raises ``ApiError``: 400 for values out of range, 422 for wrong types. Nothing is
submitted to the scheduler before it returns, so a bad field never costs a slot.

Sampling ranges live in ``SamplingParams`` (shared with the engine and the Python API); this
module checks JSON types, reads each field and maps ``SamplingError`` to a 400 naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from afmkit.errors import UserError
from afmkit.infer.api.errors import ApiError, too_large
from afmkit.infer.api.state import ServerLimits
from afmkit.infer.sampling import SamplingError, SamplingParams

MAX_NESTING = 64  # deeper JSON is no request of ours; Python's parser gives up near 1000 anyway
MAX_STOP_STRINGS = 4


@dataclasses.dataclass(frozen=True)
class Generation:
    """A validated generation request (the adapter is resolved afterwards, by name)."""

    chat: bool
    model: str
    prompt: list[int]
    sampling: SamplingParams
    stream: bool
    include_usage: bool


# -- the body ---------------------------------------------------------------------------------
def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {_shown(text)} does not fit a 64-bit float")
    return value


def parse_json(body: bytes) -> dict[str, Any]:
    """``body`` as a JSON object, or a 400: invalid UTF-8 or JSON, NaN/Infinity, numbers beyond a
    float, nesting deeper than ``MAX_NESTING``, strings with lone surrogates."""
    try:
        data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_NESTING} levels", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON: {_shown(str(exc), 200)}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _check_tree(data)
    return data


def _check_tree(data: Any) -> None:
    """Walk the parsed body once (iteratively): bounded nesting, strings that are valid Unicode."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ApiError(400, f"the request body nests deeper than {MAX_NESTING} levels", code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_string(key)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_string(value)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(
            400,
            f"a string holds a lone UTF-16 surrogate ({text[exc.start]!r} at {exc.start}); "
            "send valid Unicode (a surrogate pair or the character itself)",
            code="invalid_json",
        ) from None


async def read_json(request: Any, limits: ServerLimits) -> dict[str, Any]:
    """Read the body (at most ``limits.max_body_bytes``, chunked uploads included) and parse it."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise too_large(limits.max_body_bytes)
    return parse_json(bytes(body))


# -- fields -----------------------------------------------------------------------------------
def _shown(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and len(text) > limit:
        return f"a {len(text.lstrip('-'))}-digit integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def number(data: dict, key: str, default: Any, *, integer: bool) -> Any:
    """``data[key]`` if it is a JSON number (an integer if ``integer``), ``default`` if absent or
    null; a 422 otherwise. Its range is the caller's to check."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ApiError(422, f"'{key}' must be {kind}, got {_shown(value)}", code="invalid_type", param=key)
    return value


def _boolean(data: dict, key: str, default: bool) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(422, f"'{key}' must be true or false, got {_shown(value)}", code="invalid_type", param=key)
    return value


# A request's defaults are ``SamplingParams()``'s, except temperature, where the OpenAI API
# documents 1 (clients rely on it); afmkit's own commands and Python API default to greedy.
API_SAMPLING_DEFAULTS = dataclasses.replace(SamplingParams(), temperature=1.0)


def sampling_params(data: dict, limits: ServerLimits) -> SamplingParams:
    """The request's ``SamplingParams``. A new sampling field is read here."""
    max_tokens = number(data, "max_completion_tokens", None, integer=True)
    if max_tokens is None:
        max_tokens = number(data, "max_tokens", limits.default_max_tokens, integer=True)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens must be between 1 and {limits.max_tokens}, got {_shown(max_tokens)}",
            code="invalid_max_tokens",
            param="max_tokens",
        )
    if number(data, "n", 1, integer=True) != 1:
        raise ApiError(400, "only n=1 is supported", code="unsupported_n", param="n")
    stop = data.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(422, "'stop' must be a non-empty string or a list of them", code="invalid_type", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' holds at most {MAX_STOP_STRINGS} strings", code="invalid_stop", param="stop")
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=number(data, "temperature", API_SAMPLING_DEFAULTS.temperature, integer=False),
            top_p=number(data, "top_p", API_SAMPLING_DEFAULTS.top_p, integer=False),
            top_k=number(data, "top_k", API_SAMPLING_DEFAULTS.top_k, integer=True),
            seed=number(data, "seed", API_SAMPLING_DEFAULTS.seed, integer=True) % 2**32,  # OpenAI seeds: any integer
            stop=tuple(stop),
            presence_penalty=number(data, "presence_penalty", API_SAMPLING_DEFAULTS.presence_penalty, integer=False),
            frequency_penalty=number(data, "frequency_penalty", API_SAMPLING_DEFAULTS.frequency_penalty, integer=False),
        )
    except SamplingError as exc:
        raise ApiError(400, str(exc), code="invalid_sampling", param=exc.field) from None


def _stream_options(data: dict, stream: bool) -> bool:
    """Whether to send a final usage chunk; ``stream_options`` must be an object or null."""
    options = data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(
            422,
            f"'stream_options' must be an object like {{\"include_usage\": true}}, got {_shown(options)}",
            code="invalid_type",
            param="stream_options",
        )
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with \"stream\": true", param="stream_options")
    return _boolean(options, "include_usage", False)


def _model_name(data: dict) -> str:
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(422, "'model' is required: a string naming the model", code="invalid_type", param="model")
    return name


# -- prompts ----------------------------------------------------------------------------------
def chat_prompt(data: dict, tokenizer: Any) -> list[int]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            422, "'messages' must be a non-empty list of {role, content} objects", code="invalid_type", param="messages"
        )
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(
                422, f"messages[{i}] needs a 'role' string and 'content'", code="invalid_type", param="messages"
            )
        clean.append({"role": message["role"], "content": _content(message.get("content"), i)})
    try:
        text = tokenizer.apply_chat_template(clean)
    except UserError as exc:
        raise ApiError(400, str(exc), code="invalid_messages", param="messages") from None
    return tokenizer.encode(text)


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or OpenAI content parts of type ``text``."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(
            422,
            f"messages[{i}].content must be a string or a list of text parts",
            code="invalid_type",
            param="messages",
        )
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else None
            raise ApiError(
                400 if isinstance(kind, str) else 422,
                f'{where} must be a text part {{"type": "text", "text": ...}}'
                + (f"; this model reads text only, not {_shown(kind)}" if isinstance(kind, str) else ""),
                code="unsupported_content" if isinstance(kind, str) else "invalid_type",
                param="messages",
            )
        if not isinstance(part.get("text"), str):
            raise ApiError(
                422,
                f"{where}.text must be a string, got {_shown(part.get('text'))}",
                code="invalid_type",
                param="messages",
            )
        texts.append(part["text"])
    return "".join(texts)


def completion_prompt(data: dict, tokenizer: Any, vocab_size: int) -> list[int]:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise ApiError(400, f"token ids must lie in [0, {vocab_size})", code="invalid_prompt", param="prompt")
        return list(prompt)
    raise ApiError(
        422, "'prompt' must be a string or a list of token ids (one prompt)", code="invalid_type", param="prompt"
    )


def _check_prompt(ids: list[int], limits: ServerLimits) -> None:
    if not ids:
        raise ApiError(400, "the prompt is empty", code="empty_prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}",
            code="context_length_exceeded",
        )


def parse_generation(data: dict, *, chat: bool, model: Any, limits: ServerLimits) -> Generation:
    """Every check of a generation request, in the order a client would fix them."""
    name = _model_name(data)
    sampling = sampling_params(data, limits)
    stream = _boolean(data, "stream", False)
    include_usage = _stream_options(data, stream)
    ids = (
        chat_prompt(data, model.tokenizer)
        if chat
        else completion_prompt(data, model.tokenizer, model.config.vocab_size)
    )
    _check_prompt(ids, limits)
    return Generation(chat, name, ids, sampling, stream, include_usage)
