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


def test_info_says_which_adapter_ships_and_on_what():
    def info(name, *flags):
        out = subprocess.run(
            [sys.executable, "-m", "afmkit.cli", "info", name, *flags], capture_output=True, text=True, check=True
        )
        return out.stdout

    shipped = packaged_data("smollm2_135m_afm/adapter_config.json").parent
    run = json.loads((shipped / "afmkit_adapter.json").read_text())["name"]
    adapter = json.loads(info(NAME, "--json").splitlines()[-1])["adapter"]
    assert (adapter["base"], adapter["run"], adapter["rank"]) == ("smollm2-135m-instruct", run, 16)
    assert adapter["bytes"] == (shipped / "adapter_model.safetensors").stat().st_size
    assert {"q_proj", "down_proj"} <= set(adapter["targets"])
    compressed = json.loads(info(f"{NAME}-3.5bpw", "--json").splitlines()[-1])
    assert compressed["adapter"]["base"] == "smollm2-135m-instruct-3.5bpw" and "bits_per_weight" in compressed
    assert f"adapter: {run} (rank 16" in info(NAME)
    assert "adapter" not in json.loads(info("smollm2-135m-instruct", "--json").splitlines()[-1])


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


def test_the_compressed_post_trained_model_pairs_the_adapter_with_its_float_weights(smollm2):
    # smollm2-135m-afm-3.5bpw loads the adapter onto the 3.5-bit build without a fingerprint
    # check (the build's weights differ from those the adapter was trained on). The pairing is
    # checked here instead: the adapter was made on these float weights, and the build's
    # committed recipe was made for the same weights (the build refuses any others).
    from afmkit.adapters.peft_io import base_fingerprint
    from afmkit.compress import named
    from afmkit.compress.sensitivity import model_fingerprint
    from afmkit.weights import NAMED_ADAPTED, NAMED_COMPRESSED

    base, folder = NAMED_ADAPTED["smollm2-135m-afm-3.5bpw"]
    assert folder == NAMED_ADAPTED[NAME][1] and NAMED_COMPRESSED[base].base == NAMED_ADAPTED[NAME][0]
    made_on = json.loads(packaged_data(f"{folder}/afmkit_adapter.json").read_text())["base_fingerprint"]
    assert made_on == base_fingerprint(smollm2.config, smollm2.params)
    recipe = json.loads((named.resource_dir(NAMED_COMPRESSED[base]) / named.RECIPE_FILE).read_text())
    assert recipe["model"]["fingerprint"] == model_fingerprint(smollm2.config, smollm2.params)
