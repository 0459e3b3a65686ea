"""``smollm2-135m-afm``: the post-trained model afmkit ships as a base name plus a packaged adapter."""

import json
import subprocess
import sys

import numpy as np
import pytest

import afmkit
from afmkit.adapters.peft_io import load_adapter
from afmkit.files import packaged_data
from afmkit.weights import known_models

NAME = "smollm2-135m-afm"


def test_the_post_trained_model_is_the_base_with_its_shipped_adapter_applied(smollm2):
    model = afmkit.load(NAME, dtype="float32")
    assert NAME in known_models() and model.name == NAME
    shipped = load_adapter(packaged_data("smollm2_135m_afm/adapter_config.json").parent, config=smollm2.config)
    ids = smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}]))
    np.testing.assert_array_equal(model.logits(ids), smollm2.with_adapter(shipped).logits(ids))
    # The adapter changes what the model says: a user notices a different model.
    assert np.abs(model.logits(ids) - smollm2.logits(ids)).max() > 0.1


def test_every_command_takes_it_by_name():
    out = subprocess.run(
        [sys.executable, "-m", "afmkit.cli", "info", NAME, "--json"], capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout.splitlines()[-1])
    assert info["name"] == NAME and info["config"]["vocab_size"] == 49152


def test_every_named_model_gives_its_base_tokenizer_without_building_weights(monkeypatch):
    # ``--tokenizer NAME`` must work for every name ``--model`` takes, and must not trigger the
    # compressed model's first-load build just to read a tokenizer.
    from afmkit.compress import named
    from afmkit.data.tokenizer import load_tokenizer

    monkeypatch.setattr(named, "build", lambda *a, **k: pytest.fail("a tokenizer must not build weights"))
    base = load_tokenizer("smollm2-135m-instruct")
    for name in afmkit.known_models():
        tokenizer = load_tokenizer(name)
        assert tokenizer.encode("Hello, world") == base.encode("Hello, world"), name
