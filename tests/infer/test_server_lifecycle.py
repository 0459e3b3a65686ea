"""The server as an operator sees it: flags checked before anything loads, a scheduler that
survives any one request's failure (and says so truthfully on /health), work cancelled when its
client leaves, and a SIGTERM that always stops the process."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from afmkit.cli import main as afmkit_main
from afmkit.infer.engine import Request
from afmkit.infer.sampling import SamplingParams
from afmkit.infer.server import ServerLimits, create_app

LIMITS = ServerLimits(max_prompt_tokens=96, max_tokens=48, default_max_tokens=8)


# -- flags ------------------------------------------------------------------------------------
@pytest.fixture
def busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-batch", "0"], "--max-batch"),
        (["--max-batch", "-2"], "--max-batch"),
        (["--adapter-slots", "0", "--adapters", "{adapters}"], "--adapter-slots"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--max-prompt-tokens", "0"], "--max-prompt-tokens"),
        (["--max-body-bytes", "-1"], "--max-body-bytes"),
        (["--cache-bytes", "0"], "--cache-bytes"),
        (["--port", "70000"], "--port"),
        (["--port", "{busy_port}"], "already in use"),
        (["--adapters", "{adapters}/missing"], "does not exist"),
    ],
)
def test_serve_refuses_bad_flags_in_one_line_before_loading_the_model(flags, named, tmp_path, busy_port, capsys):
    # The model path does not exist either: the flag's error proves it came before any loading.
    args = [f.format(adapters=tmp_path, busy_port=busy_port) for f in flags]
    started = time.perf_counter()
    assert afmkit_main(["serve", "--model", str(tmp_path / "no-such-model"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err and "Traceback" not in err, err
    assert time.perf_counter() - started < 5


# -- a live server with a scheduler the tests can slow down or break ---------------------------
@pytest.fixture(scope="module")
def server(tiny_model, live_server):
    app = create_app(tiny_model, served_name="tiny", max_batch=2, limits=LIMITS)
    return live_server(app)


def _slow_steps(monkeypatch, scheduler, seconds):
    """A slower device: every decode step of the current batch takes ``seconds`` more."""
    batch = scheduler.batch
    step = batch.step

    def slow():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(batch, "step", slow)


def _prompt(model, text):
    return model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def _solo(model, text, max_tokens):
    return model.engine.generate([_prompt(model, text)], SamplingParams(max_new_tokens=max_tokens))[0]


def _stream(server, text, max_tokens, out, key):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    pieces, errors = [], []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                else:
                    pieces += [c["delta"].get("content") or "" for c in event["choices"]]
    out[key] = ("".join(pieces), errors)


def _wait(predicate, timeout=60, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.02)


def _health(server):
    response = httpx.get(server.url + "/health", timeout=30)
    return response.status_code, response.json()


def test_one_requests_failure_fails_it_alone(server, tiny_model, monkeypatch):
    """A request that cannot start (here a top_k the device's int32 cannot hold, smuggled past
    the API's validation) gets its error; the streams already running and a request admitted
    alongside it finish with the tokens they get alone."""
    scheduler = server.scheduler
    _slow_steps(monkeypatch, scheduler, 0.02)
    failed_before = scheduler.stats.failed
    texts = ["Tell me a story.", "What is rain?"]
    out = {}
    threads = [threading.Thread(target=_stream, args=(server, t, 30, out, i)) for i, t in enumerate(texts)]
    for t in threads:
        t.start()
    _wait(lambda: scheduler.running == 2, what="both streams running")
    poison = SamplingParams(max_new_tokens=5, temperature=1.0)
    object.__setattr__(poison, "top_k", 2**31)
    events = {"poison": [], "good": []}
    scheduler.submit(Request(_prompt(tiny_model, "x"), poison), events["poison"].append)
    good_sampling = SamplingParams(max_new_tokens=6)
    scheduler.submit(Request(_prompt(tiny_model, "Hi!"), good_sampling), events["good"].append)
    for t in threads:
        t.join(timeout=120)
    for i, text in enumerate(texts):
        assert out[i] == (_solo(tiny_model, text, 30).text, [])
    _wait(lambda: events["good"] and (events["good"][-1].finish_reason or isinstance(events["good"][-1], Exception)))
    assert [e.token for e in events["good"]] == _solo(tiny_model, "Hi!", 6).tokens
    assert len(events["poison"]) == 1 and isinstance(events["poison"][0], Exception)
    _wait(lambda: scheduler.running == 0 and scheduler.queue_depth == 0)
    status, health = _health(server)
    assert status == 200 and health["status"] == "ok"
    assert (health["running"], health["queued"], health["failed"]) == (0, 0, failed_before + 1)


def test_a_failed_decode_step_fails_its_rows_and_the_queue_is_still_served(server, tiny_model, monkeypatch):
    """A step that raises (a device fault) ends the rows in it with an error event; the request
    queued behind them (the batch holds 2) runs on a fresh batch and matches its solo output."""
    scheduler = server.scheduler
    batch = scheduler.batch
    step, fault = batch.step, threading.Event()

    def faulty():
        time.sleep(0.05)
        if fault.is_set():
            fault.clear()
            raise RuntimeError("device fault")
        return step()

    monkeypatch.setattr(batch, "step", faulty)
    texts = ["One two three.", "Red green blue.", "Queued behind them."]
    out = {}
    threads = [threading.Thread(target=_stream, args=(server, t, 30, out, i)) for i, t in enumerate(texts)]
    for t in threads[:2]:
        t.start()
    _wait(lambda: scheduler.running == 2, what="two rows running")
    threads[2].start()
    _wait(lambda: _health(server)[1]["queued"] == 1, what="the third request queued, as /health says")
    fault.set()
    for t in threads:
        t.join(timeout=120)
    for i in (0, 1):
        assert out[i][1] and "generation failed" in out[i][1][0]["message"]
    assert out[2] == (_solo(tiny_model, texts[2], 30).text, [])
    assert scheduler.batch is not batch  # a fresh batch replaced the failed one
    _wait(lambda: scheduler.running == 0)
    assert _health(server)[1]["running"] == 0


def test_a_non_streaming_client_that_disconnects_cancels_its_job(server, monkeypatch):
    scheduler = server.scheduler
    _slow_steps(monkeypatch, scheduler, 0.5)  # 48 tokens now take over 24 s
    stats = scheduler.stats
    cancelled, completed, generated = stats.cancelled, stats.completed, stats.generated_tokens
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 48}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    # A step that compiles can hold the cancel up on a busy machine: allow for it, but well
    # before the 48 tokens could have finished.
    _wait(lambda: stats.cancelled == cancelled + 1 and scheduler.running == 0, timeout=20, what="cancelled")
    assert stats.completed == completed and stats.generated_tokens - generated < 48


def test_the_access_log_has_one_line_per_request(server, tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="afmkit.access")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    out = {}
    _stream(server, "Hello", 7, out, "s")
    assert httpx.post(server.url + "/v1/chat/completions", json={**body, "top_p": 2}, timeout=60).status_code == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "afmkit.access"]
    assert len(lines) == 3, lines
    tokens_in = len(_prompt(tiny_model, "Hello"))
    expected_out = len(_solo(tiny_model, "Hello", 5).tokens), len(_solo(tiny_model, "Hello", 7).tokens)
    pattern = r'127\.0\.0\.1 "POST /v1/chat/completions" (\d+) model=(\S+) tokens_in=(\d+) tokens_out=(\d+) [\d.]+s'
    parsed = [re.fullmatch(pattern, line).groups() for line in lines]
    assert parsed[0] == ("200", "tiny", str(tokens_in), str(expected_out[0]))
    assert parsed[1] == ("200", "tiny", str(tokens_in), str(expected_out[1]))
    assert parsed[2] == ("400", "-", "0", "0")


# -- SIGTERM ----------------------------------------------------------------------------------
STUCK_SERVER = """
import sys, time
import afmkit
from afmkit.infer.server import ServerLimits, bind, create_app, serve

model = afmkit.load(sys.argv[1])
app = create_app(model, served_name="tiny", max_batch=2, limits=ServerLimits(max_prompt_tokens=64, max_tokens=32))
app.state.server.scheduler.batch.step = lambda: time.sleep(3600)  # a device that never answers
sock = bind("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
serve(app, sock)
"""


def test_sigterm_stops_a_server_whose_requests_can_never_finish(tiny_model, tmp_path):
    model_dir = tiny_model.save(tmp_path / "model")
    script = tmp_path / "stuck_server.py"
    script.write_text(STUCK_SERVER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, str(script), str(model_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        port = int(process.stdout.readline())
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        replies = {}

        def ask(key, stream):
            try:
                replies[key] = httpx.post(url, json={**body, "stream": stream}, timeout=120)
            except httpx.HTTPError as exc:
                replies[key] = exc

        threads = [threading.Thread(target=ask, args=(k, k == "stream")) for k in ("plain", "stream")]
        for t in threads:
            t.start()

        def held():
            health = httpx.get(f"http://127.0.0.1:{port}/health").json()
            return health["running"] + health["queued"] == 2

        _wait(held, what="one request stuck in a step, one queued behind it")
        started = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its shutdown is done: the status says SIGTERM ended it.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert time.perf_counter() - started < 20
        for t in threads:
            t.join(timeout=30)
        assert replies["plain"].status_code == 503
        assert replies["plain"].json()["error"]["code"] == "server_shutting_down"
        assert "server_shutting_down" in replies["stream"].text  # the stream ends with an error event
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
