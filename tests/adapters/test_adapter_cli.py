"""The adapter flag combinations that docs/adapters.md and docs/serving.md document, run through
the ``afmkit`` command itself: ``adapter train --dtype float32|int4`` and ``serve --dtype int4
--adapters DIR`` answering a request for an adapter. On afm-tiny (SmolLM2's tokenizer, random
weights) saved as a checkpoint, so each runs in seconds; a few optimizer steps, since what is
tested is that the flags work together, not what the adapter learns (test_train.py covers that)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import afmkit
from afmkit.adapters.peft_io import AFMKIT_FILE, CONFIG_FILE, WEIGHTS_FILE, base_fingerprint, load_adapter
from afmkit.cli import main
from afmkit.infer.sampling import SamplingParams

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return tiny_model.save(tmp_path_factory.mktemp("ckpt") / "afm-tiny")


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": f"Reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]}
        for w in WORDS
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _train(checkpoint, chats, out, dtype):
    flags = (
        f"--rank 4 --targets q,v,down --steps 3 --batch 2 --lr 1e-3 --eval-fraction 0.25 --save-every 2 --dtype {dtype}"
    )
    where = ["--model", str(checkpoint), "--data", str(chats), "--out", str(out)]
    return main(["adapter", "train", *where, *flags.split()])


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_adapter_train_on_each_documented_dtype(checkpoint, chats, tmp_path, dtype, capsys):
    """``--dtype int4`` trains on the packed base (it used to crash fingerprinting it); the
    adapter is saved for, and loads onto, the base at that dtype."""
    assert _train(checkpoint, chats, tmp_path / "rev", dtype) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_conversations"] == 6
    assert {CONFIG_FILE, WEIGHTS_FILE, AFMKIT_FILE} <= {p.name for p in (tmp_path / "rev").iterdir()}
    base = afmkit.load(checkpoint, dtype=dtype)
    saved = json.loads((tmp_path / "rev" / AFMKIT_FILE).read_text())
    assert saved["base_fingerprint"] == base_fingerprint(base.config, base.params)
    adapter = load_adapter(tmp_path / "rev", config=base.config, params=base.params)
    assert adapter.config.rank == 4 and adapter.config.targets == ("q", "v", "down")


def test_adapter_train_refuses_a_model_that_loads_with_an_adapter(chats, tmp_path, capsys):
    """A new adapter trains over the weights alone, so the post-trained model's own adapter would
    silently not count: one line naming the flag that continues it, and nothing written."""
    out = tmp_path / "task"
    assert main(["adapter", "train", "--model", "smollm2-135m-afm", "--data", str(chats), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "loads with an adapter" in err and "--init-from-recovery" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_int4_with_adapters_answers_an_adapter_request(checkpoint, chats, tmp_path):
    """``afmkit serve --dtype int4 --adapters DIR`` starts (it used to crash at start) and serves
    ``model:adapter`` with the same greedy tokens as the engine running that adapter on the same
    int4 base."""
    adapters = tmp_path / "adapters"
    assert _train(checkpoint, chats, adapters / "rev", "int4") == 0
    port = _free_port()
    command = [sys.executable, "-m", "afmkit.cli", "serve", "--model", str(checkpoint), "--dtype", "int4"]
    command += ["--adapters", str(adapters), "--served-name", "tiny", "--port", str(port), "--max-batch", "2"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, f"afmkit serve exited: {server.stdout.read()}"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "afmkit serve did not start"
            time.sleep(0.5)
        body = {"model": "tiny:rev", "prompt": "Reverse: stone", "max_tokens": 6, "temperature": 0}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        tokens = reply.json()["usage"]["completion_tokens"]
        text = reply.json()["choices"][0]["text"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    model = afmkit.load(checkpoint, dtype="int4")
    adapter = load_adapter(adapters / "rev", config=model.config, params=model.params)
    expected = model.engine.generate(
        [model.tokenizer.encode("Reverse: stone")], SamplingParams(max_new_tokens=6), adapters=adapter
    )[0]
    assert (text, tokens) == (expected.text, len(expected.tokens))
