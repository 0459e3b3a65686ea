"""A client that reads its stream slowly delays nobody else (issue 11 §2), driven over HTTP
against the real server: the scheduler hands events to the client's queue and never waits for a
socket, so other rows keep decoding and the slow client still gets every token in the end."""

import http.client
import json
import socket
import time

import httpx

from afmkit.infer.sampling import SamplingParams
from afmkit.infer.server import ServerLimits, create_app

LONG = 600  # tokens: ~100 kB of events, far more than the slow client's 4 kB receive window


def _body(content, max_tokens, stream):
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def _solo(model, content, max_tokens):
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": content}]))
    return model.engine.generate([ids], SamplingParams(max_new_tokens=max_tokens))[0]


def test_a_client_that_does_not_read_its_stream_stalls_nobody(tiny_model, live_server):
    app = create_app(tiny_model, served_name="tiny", max_batch=4, limits=ServerLimits(max_tokens=LONG))
    server = live_server(app)
    # The slow client: a tiny receive buffer, and it reads nothing until the others are done.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    slow = http.client.HTTPConnection("127.0.0.1", server.port)
    slow.sock = sock
    slow.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(_body("tell me a story", LONG, True)),
        {"Content-Type": "application/json"},
    )
    response = slow.getresponse()
    assert response.status == 200
    # Others come and go while the slow stream is unread.
    start = time.perf_counter()
    for question in ("hi", "what is a cat?", "count to three"):
        reply = httpx.post(server.url + "/v1/chat/completions", json=_body(question, 8, False), timeout=300)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == _solo(tiny_model, question, 8).text
    # The slow client's row ran to its end too: its tokens wait in its queue, not in the batch.
    deadline = time.perf_counter() + 300
    while server.scheduler.running and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert server.scheduler.running == 0, (
        f"the slow client's row still holds the batch after {time.perf_counter() - start:.0f} s"
    )
    # Nothing was lost: it now reads every event, the same text as a solo run.
    pieces, finish = [], None
    for line in response.read().decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                pieces.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    want = _solo(tiny_model, "tell me a story", LONG)
    assert "".join(pieces) == want.text and finish == want.finish_reason
    assert len(want.tokens) == LONG, "a short stream would fit the socket buffers and prove little"
    slow.close()
