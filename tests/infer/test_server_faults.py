"""Faults found by trying the server as a client, an attacker and an operator would (issue 11):
each one driven over HTTP against the real app, and each answered without harming anyone else."""

import dataclasses
import http.client
import json
import os
import re
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.adapters.lora import TARGETS, AdapterBank, LoraAdapter, LoraConfig, lora_shapes
from afmkit.adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE, read_safetensors, save_adapter, write_safetensors
from afmkit.config import get_size
from afmkit.infer.engine import Request
from afmkit.infer.sampling import SamplingParams
from afmkit.infer.server import ServerLimits, create_app
from afmkit.model.transformer import forward, init_params

KEY = "fault-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# A large body limit, so the 100,000 nested brackets reach the JSON parser.
LIMITS = ServerLimits(max_prompt_tokens=96, max_tokens=48, default_max_tokens=8, max_body_bytes=1 << 20)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


def _adapter(config, lora, seed, name=""):
    """A random adapter with non-zero B, made in numpy (eager JAX random per weight is slow):
    A ~ N(0, 1/fan_in), B ~ N(0, 1), stored in fp16."""
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(config.n_layers):
        layer = {}
        for target in lora.targets:
            a_shape, b_shape = lora_shapes(config, TARGETS[target], lora.rank)
            a = rng.standard_normal(a_shape) / np.sqrt(np.prod(a_shape[:-1]))
            layer[TARGETS[target]] = {"a": a.astype(np.float16), "b": rng.standard_normal(b_shape).astype(np.float16)}
        weights.append(layer)
    return LoraAdapter(config=lora, weights=weights, name=name)


def _save(directory, adapter, model):
    save_adapter(directory / adapter.name, adapter, config=model.config, params=model.params)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fault-adapters")
    config = tiny_model.config
    made = {
        "low": _adapter(config, LoraConfig(rank=4), 11, "low"),
        "high": _adapter(config, LoraConfig(rank=16, targets=("q", "v", "down")), 12, "high"),
    }
    for adapter in made.values():
        _save(directory, adapter, tiny_model)
    # One NaN in one tensor of an otherwise good adapter.
    nan = _adapter(config, LoraConfig(rank=4), 13, "nan")
    _save(directory, nan, tiny_model)
    tensors = dict(read_safetensors(directory / "nan" / WEIGHTS_FILE))
    bad_key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[bad_key] = np.array(tensors[bad_key])
    tensors[bad_key][0, 0] = np.nan
    write_safetensors(directory / "nan" / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    # A config whose 'r' disagrees with its tensors.
    _save(directory, dataclasses.replace(made["low"], name="wrong-r"), tiny_model)
    config_path = directory / "wrong-r" / CONFIG_FILE
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 8}))
    return directory, made, bad_key


@pytest.fixture(scope="module")
def server(tiny_model, adapters, live_server):
    # Fewer adapter slots (3) than batch rows (4): decode steps use the all-slots schedule.
    app = create_app(
        tiny_model,
        served_name="tiny",
        adapters_dir=str(adapters[0]),
        api_key=KEY,
        max_batch=4,
        adapter_slots=3,
        limits=LIMITS,
    )
    return live_server(app)


def _solo(model, content, adapter, max_tokens):
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": content}]))
    return model.engine.generate([ids], SamplingParams(max_new_tokens=max_tokens), adapters=adapter)[0].text


def _chat(server, content, model="tiny", max_tokens=12, stream=False):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    response = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["choices"][0]["message"]["content"]
    pieces = []
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            assert "error" not in event, event
            pieces += [c["delta"].get("content") or "" for c in event["choices"]]
    return "".join(pieces)


def _concurrently(calls):
    results = [None] * len(calls)
    errors = []

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def _errors_counted(server):
    text = httpx.get(server.url + "/metrics").text
    return sum(int(n) for n in re.findall(r"^afmkit_http_errors_total\{[^}]*\} (\d+)$", text, re.M))


def _health(server):
    response = httpx.get(server.url + "/health", timeout=30)
    return response.status_code, response.json()


def _idle(server, timeout=60):
    deadline = time.time() + timeout
    while True:
        status, body = _health(server)
        if body["running"] == 0 and body["queued"] == 0:
            return status, body
        assert time.time() < deadline, body
        time.sleep(0.05)


# -- malformed bodies -------------------------------------------------------------------------
def _body(**fields):
    return json.dumps({**CHAT, **fields})


DIGITS_401 = "9" * 401
MALFORMED = {
    "temperature-401-digits": (_body()[:-1] + f', "temperature": {DIGITS_401}}}', 400, "invalid_sampling"),
    "temperature-beyond-float": (_body()[:-1] + ', "temperature": 1e400}', 400, "invalid_json"),
    "temperature-Infinity": (_body()[:-1] + ', "temperature": Infinity}', 400, "invalid_json"),
    "temperature-NaN": (_body()[:-1] + ', "temperature": NaN}', 400, "invalid_json"),
    "temperature-over-bound": (_body(temperature=101), 400, "invalid_sampling"),
    "top-k-2**31": (_body(temperature=1, top_k=2147483648), 400, "invalid_sampling"),
    "top-k-negative": (_body(top_k=-1), 400, "invalid_sampling"),
    "top-p-zero": (_body(top_p=0), 400, "invalid_sampling"),
    "presence-penalty-3": (_body(presence_penalty=3), 400, "invalid_sampling"),
    "frequency-penalty-string": (_body(frequency_penalty="lots"), 422, "invalid_type"),
    "top-p-string": (_body(top_p="high"), 422, "invalid_type"),
    "max-tokens-401-digits": (_body()[:-1] + f', "max_tokens": {DIGITS_401}}}', 400, "invalid_max_tokens"),
    "seed-float": (_body(seed=1.5), 422, "invalid_type"),
    "content-part-text-123": (
        _body(messages=[{"role": "user", "content": [{"type": "text", "text": 123}]}]),
        422,
        "invalid_type",
    ),
    "content-part-image": (
        _body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "unsupported_content",
    ),
    "lone-surrogate": (_body()[:-1] + ', "user": "a\\ud800b"}', 400, "invalid_json"),
    "lone-surrogate-in-content": (
        '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        400,
        "invalid_json",
    ),
    "100000-nested-brackets": ("[" * 100_000, 400, "invalid_json"),
    "nested-object-300": (
        _body()[:-1] + ', "metadata": ' + '{"a": ' * 300 + "1" + "}" * 300 + "}",
        400,
        "invalid_json",
    ),
    "invalid-utf8": (b'{"model": "tiny\xff"}', 400, "invalid_json"),
    "stream-options-string": (_body(stream=True, stream_options="yes"), 422, "invalid_type"),
    "stream-options-without-stream": (_body(stream_options={"include_usage": True}), 400, None),
    "stream-string": (_body(stream="yes"), 422, "invalid_type"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_body_gets_an_openai_error_on_a_kept_alive_connection(server, case):
    body, status, code = MALFORMED[case]
    errors_before, submitted_before = _errors_counted(server), server.scheduler.stats.submitted
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    headers = {**AUTH, "Content-Type": "application/json"}
    connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
    response = connection.getresponse()
    payload = json.loads(response.read())
    assert response.status == status, payload
    assert set(payload["error"]) == {"message", "type", "code", "param"} and payload["error"]["message"]
    assert payload["error"]["code"] == code
    assert len(payload["error"]["message"]) < 400  # a 401-digit number is described, not echoed
    assert not response.will_close  # the keep-alive connection survives ...
    connection.request("POST", "/v1/chat/completions", body=json.dumps(CHAT), headers=headers)
    follow_up = connection.getresponse()
    assert follow_up.status == 200 and json.loads(follow_up.read())["choices"]  # ... and serves the next one
    connection.close()
    assert _errors_counted(server) == errors_before + 1
    # Nothing reached the scheduler but the follow-up: invalid requests are refused before submitting.
    assert server.scheduler.stats.submitted == submitted_before + 1


def test_an_unexpected_exception_is_a_json_500_that_keeps_the_connection(server, monkeypatch):
    from afmkit.infer.api import routes

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(routes, "parse_generation", broken)
    errors_before = _errors_counted(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(CHAT), headers=AUTH)
    response = connection.getresponse()
    payload = json.loads(response.read())
    assert response.status == 500 and payload["error"]["code"] == "internal_error"
    assert "/" not in payload["error"]["message"]  # no traceback or paths
    assert not response.will_close
    monkeypatch.undo()
    connection.request("POST", "/v1/chat/completions", body=json.dumps(CHAT), headers=AUTH)
    assert connection.getresponse().status == 200
    assert _errors_counted(server) == errors_before + 1


def test_penalties_reach_the_engine(server, tiny_model):
    content = "Repeat after me: la la la la la."
    ids = tiny_model.tokenizer.encode(tiny_model.tokenizer.apply_chat_template([{"role": "user", "content": content}]))
    # Negative penalties: this random model never repeats itself, so rewarding repeats shows.
    sampling = SamplingParams(max_new_tokens=20, presence_penalty=-2, frequency_penalty=-1.5)
    expected = tiny_model.engine.generate([ids], sampling)[0].text
    assert expected != tiny_model.engine.generate([ids], SamplingParams(max_new_tokens=20))[0].text
    body = {**CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": 20}
    body.update(presence_penalty=-2, frequency_penalty=-1.5)
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120).json()
    assert reply["choices"][0]["message"]["content"] == expected


def test_openapi_schema_needs_the_api_key(server):
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    assert httpx.get(server.url + "/openapi.json", headers=AUTH).json()["paths"]
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


# -- adapters ---------------------------------------------------------------------------------
def test_a_non_finite_adapter_is_refused_naming_the_tensor_without_server_paths(server, adapters):
    directory, _, bad_key = adapters
    response = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "model": "tiny:nan"}, headers=AUTH)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "adapter_corrupt" and bad_key in error["message"] and "NaN" in error["message"]
    assert str(directory) not in response.text and str(directory.resolve()) not in response.text
    response = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "model": "tiny:wrong-r"}, headers=AUTH)
    error = response.json()["error"]
    assert response.status_code == 500 and error["code"] == "adapter_corrupt"
    assert "r=8" in error["message"] and "another base model" not in error["message"]
    assert str(directory) not in response.text


def test_a_nan_adapter_in_the_bank_cannot_change_other_rows(server, tiny_model, adapters):
    """Even if a non-finite adapter reached a bank slot, rows of other slots (base rows and other
    adapters) get exactly what they get alone: slots are selected, never masked by a multiply."""
    _, made, _ = adapters
    low = made["low"]
    prompts = ["Tell me about cats.", "Why is the sky blue?", "Name a color.", "Count to five."]
    models = ["tiny", "tiny:low", "tiny", "tiny:low"]
    expected = [_solo(tiny_model, p, low if m == "tiny:low" else None, 12) for p, m in zip(prompts, models)]
    assert expected[1] != _solo(tiny_model, prompts[1], None, 12)  # the adapter matters
    assert _chat(server, prompts[1], "tiny:low") == expected[1]  # the bank exists, "low" in it
    _idle(server)
    poison = dataclasses.replace(
        low, name="poison", weights=jax.tree.map(lambda x: np.full(np.shape(x), np.nan, np.float16), low.weights)
    )
    batch = server.scheduler.batch
    free = next(s for s in range(1, batch.adapter_slots) if batch.bank_entries[s] is None)
    batch.bank.put(free, poison)  # the scheduler is idle: nothing else touches the bank now
    assert batch.bank.slots < 4  # decode steps of 4 rows take the all-slots schedule
    got = _concurrently([lambda p=p, m=m: _chat(server, p, m, stream=True) for p, m in zip(prompts, models)])
    assert got == expected


def test_adapters_of_different_ranks_share_one_batch(server, tiny_model, adapters):
    """A rank-16 adapter joins a bank laid out for rank 4 without waiting for its rows, and
    every row matches its adapter alone (zero-padded LoRA factors add exact zeros)."""
    _, made, _ = adapters
    cases = [("Summarize the weather.", "tiny:low"), ("List three fruits.", "tiny:high"), ("Say hi.", "tiny")]
    cases += [("Write a haiku.", "tiny:high"), ("Describe a dog.", "tiny:low")]
    which = {"tiny:low": made["low"], "tiny:high": made["high"], "tiny": None}
    expected = [_solo(tiny_model, p, which[m], 16) for p, m in cases]
    got = _concurrently([lambda p=p, m=m: _chat(server, p, m, max_tokens=16) for p, m in cases])
    assert got == expected
    assert server.scheduler.batch.bank.rank == 16


def test_a_larger_rank_is_admitted_while_a_smaller_one_runs(tiny_model, adapters):
    _, made, _ = adapters
    batch = tiny_model.engine.new_batch(slots=4, capacity=257, adapter_slots=3)
    ids = tiny_model.tokenizer.encode("Hello there")
    low = Request(ids, SamplingParams(max_new_tokens=30), made["low"])
    assert batch.admit([low])[0] == [low]
    batch.step()
    high = Request(ids, SamplingParams(max_new_tokens=30), made["high"])
    assert batch.admit([high])[0] == [high]  # admitted now, not after "low" finishes
    assert low.row is not None and not low.row.finished


def test_bank_rows_are_immune_to_other_slots_in_both_schedules():
    """The bank's two schedules (gather for prefill, all-slots for decode) against a bank
    without the poisoned slot: other rows are bitwise equal, the poisoned row is NaN."""
    config = get_size("test-tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    low = _adapter(config, LoraConfig(rank=4), 1, "low")
    high = _adapter(config, LoraConfig(rank=8, targets=("q", "down")), 2, "high")
    poison = dataclasses.replace(
        low, name="poison", weights=jax.tree.map(lambda x: np.full(np.shape(x), np.nan, np.float16), low.weights)
    )
    clean = AdapterBank.for_adapters(config, [low, high], slots=4)
    dirty = AdapterBank.for_adapters(config, [low, high, poison], slots=4)
    row_slots = [0, 1, 2, 0, 1, 2, 3, 0]  # 8 rows, 4 slots: decode uses the all-slots schedule
    for tokens_per_row in (1, 5):
        tokens = jnp.asarray(np.arange(8 * tokens_per_row).reshape(8, tokens_per_row) % 500 + 3)
        positions = jnp.broadcast_to(jnp.arange(tokens_per_row), tokens.shape)
        run = jax.jit(lambda t, p, lora: forward(params, t, p, None, config=config, adapters=lora)[0])
        out_clean = run(tokens, positions, clean.rows(row_slots))
        out_dirty = run(tokens, positions, dirty.rows(row_slots))
        others = [i for i, s in enumerate(row_slots) if s != 3]
        np.testing.assert_array_equal(np.asarray(out_dirty)[others], np.asarray(out_clean)[others])
        assert np.isnan(np.asarray(out_dirty)[6]).all()


def test_stale_temporary_folders_of_killed_saves_are_removed_at_start(tiny_model, adapters, tmp_path):
    directory = tmp_path / "adapters"
    directory.mkdir()
    stale, fresh = directory / ".low.tmp-abc123", directory / ".high.tmp-def456"
    for path in (stale, fresh):
        path.mkdir()
        (path / WEIGHTS_FILE).write_bytes(b"half a file")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    create_app(
        tiny_model, served_name="tiny", adapters_dir=str(directory), limits=LIMITS
    ).state.server.scheduler.close()
    assert not stale.exists() and fresh.exists()  # a fresh one may be a save under way
