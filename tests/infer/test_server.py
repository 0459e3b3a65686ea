"""The OpenAI-compatible server on loopback: the official ``openai`` client, adapters by name,
continuous batching, and every fault case answered with the right status while others are served."""

import json
import shutil
import time

import httpx
import jax
import pytest

from afmkit.adapters.lora import LoraConfig, random_adapter
from afmkit.adapters.peft_io import WEIGHTS_FILE, save_adapter
from afmkit.infer.sampling import SamplingParams
from afmkit.infer.server import ServerLimits, create_app

KEY = "test-key"
LIMITS = ServerLimits(max_prompt_tokens=96, max_tokens=48, default_max_tokens=16, max_body_bytes=4096)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapters")
    config, params = tiny_model.config, tiny_model.params
    made = {}
    for seed, name in enumerate(["alpha", "beta"]):
        made[name] = random_adapter(config, LoraConfig(rank=8), jax.random.PRNGKey(seed), b_std=1.0, name=name)
        save_adapter(directory / name, made[name], config=config, params=params)
    other_base = jax.tree.map(lambda w: w * 1.01, params)
    save_adapter(directory / "foreign", made["alpha"], config=config, params=other_base)
    shutil.copytree(directory / "beta", directory / "broken")
    (directory / "broken" / WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    return directory, made


@pytest.fixture(scope="module")
def server(tiny_model, adapters, live_server):
    app = create_app(
        tiny_model, served_name="tiny", adapters_dir=str(adapters[0]), api_key=KEY, max_batch=4, limits=LIMITS
    )
    return live_server(app)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _expected(model, messages, adapter, max_tokens):
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(messages))
    return model.engine.generate([ids], SamplingParams(max_new_tokens=max_tokens), adapters=adapter)[0], len(ids)


def test_openai_client_chat_with_an_adapter_streaming_and_not(client, tiny_model, adapters):
    messages = [{"role": "user", "content": "Summarize: the cat sat on the mat."}]
    expected, prompt_len = _expected(tiny_model, messages, adapters[1]["alpha"], 12)
    base, _ = _expected(tiny_model, messages, None, 12)
    assert expected.tokens != base.tokens
    reply = client.chat.completions.create(model="tiny:alpha", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == prompt_len and reply.usage.completion_tokens == len(expected.tokens)
    stream = client.chat.completions.create(
        model="tiny:alpha",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected.text and finish == expected.finish_reason
    assert usage.completion_tokens == len(expected.tokens)
    base_reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert base_reply.choices[0].message.content == base.text


def test_openai_client_completions_and_models(client, tiny_model):
    ids = tiny_model.tokenizer.encode("Once upon a time")
    expected = tiny_model.engine.generate([ids], SamplingParams(max_new_tokens=10))[0]
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert out.choices[0].text == expected.text and out.usage.completion_tokens == len(expected.tokens)
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
        )
    )
    assert text == expected.text
    names = {m.id for m in client.models.list()}
    assert {"tiny", "tiny:alpha", "tiny:beta"} <= names


def _post(server, path, body, *, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers, timeout=120)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize(
    ("body", "kwargs", "status", "code"),
    [
        (CHAT, {"key": None}, 401, "invalid_api_key"),
        (CHAT, {"key": "wrong"}, 401, "invalid_api_key"),
        ({**CHAT, "model": "other"}, {}, 404, "model_not_found"),
        ({**CHAT, "model": "tiny:nope"}, {}, 404, "adapter_not_found"),
        ({**CHAT, "model": "tiny:../alpha"}, {}, 400, "invalid_adapter_name"),
        ({**CHAT, "model": "tiny:foreign"}, {}, 400, "adapter_incompatible"),
        ({**CHAT, "model": "tiny:broken"}, {}, 500, "adapter_corrupt"),
        (None, {"raw": "{not json"}, 400, "invalid_json"),
        ({**CHAT, "messages": "hi"}, {}, 422, "invalid_type"),
        ({**CHAT, "max_tokens": "many"}, {}, 422, "invalid_type"),
        ({**CHAT, "max_tokens": 10_000}, {}, 400, "invalid_max_tokens"),
        ({**CHAT, "messages": [{"role": "user", "content": "word " * 200}]}, {}, 400, "context_length_exceeded"),
        ({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}, {}, 413, "request_too_large"),
    ],
)
def test_faults_get_the_right_status_and_an_openai_error_body(server, body, kwargs, status, code):
    response = _post(server, "/v1/chat/completions", body, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    # ... and the server keeps serving everyone else.
    assert _post(server, "/v1/chat/completions", CHAT).status_code == 200


def test_a_chunked_oversized_body_is_refused_too(server):
    def body():
        for _ in range(10):
            yield b" " * 1000

    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(server.url + "/v1/completions", content=body(), headers=headers, timeout=60)
    assert response.status_code == 413


def test_client_disconnect_mid_stream_frees_its_slot(server, client):
    app_scheduler = server.server.config.app.state.scheduler
    cancelled = app_scheduler.stats.cancelled
    body = {**CHAT, "max_tokens": 48, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line and '""' not in line:
                break
    deadline = time.time() + 60
    while app_scheduler.stats.cancelled == cancelled or app_scheduler.running:
        assert time.time() < deadline, "the disconnected stream kept its slot"
        time.sleep(0.05)
    reply = client.chat.completions.create(model="tiny:beta", messages=CHAT["messages"], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_adapters_endpoint_loads_and_unloads_and_metrics_count_them(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    loaded = httpx.post(server.url + "/v1/adapters", json={"name": "beta"}, headers=headers).json()
    assert loaded["loaded"] and loaded["bytes"] > 0
    listing = httpx.get(server.url + "/v1/adapters", headers=headers).json()["data"]
    assert {"name": "beta", "model": "tiny:beta", "loaded": True} in listing
    assert httpx.delete(server.url + "/v1/adapters/beta", headers=headers).json()["was_loaded"]
    assert httpx.delete(server.url + "/v1/adapters/nope", headers=headers).status_code == 404
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    for name in (
        "afmkit_queue_depth",
        "afmkit_tokens_per_second",
        "afmkit_adapter_cache_hits_total",
        "afmkit_adapter_cache_evictions_total",
        "afmkit_generated_tokens_total",
    ):
        assert f"\n{name} " in "\n" + metrics


def test_a_cache_budget_smaller_than_one_adapter_is_a_clear_error(tiny_model, adapters, live_server):
    app = create_app(tiny_model, served_name="tiny", adapters_dir=str(adapters[0]), cache_bytes=1000, limits=LIMITS)
    live = live_server(app)
    response = httpx.post(live.url + "/v1/chat/completions", json={**CHAT, "model": "tiny:alpha"}, timeout=60)
    assert response.status_code == 507
    assert "cache-bytes" in response.json()["error"]["message"]
    assert httpx.post(live.url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200


def test_a_request_keeps_its_adapter_when_it_is_unloaded_mid_stream(server, tiny_model, adapters):
    messages = [{"role": "user", "content": "Keep going please."}]
    expected, _ = _expected(tiny_model, messages, adapters[1]["beta"], 40)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny:beta", "messages": messages, "max_tokens": 40, "temperature": 0, "stream": True}
    pieces, unloaded = [], False
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            pieces.append(delta.get("content") or "")
            if not unloaded and len(pieces) > 3:
                assert httpx.delete(server.url + "/v1/adapters/beta", headers=headers).status_code == 200
                unloaded = True
    assert unloaded and "".join(pieces) == expected.text
