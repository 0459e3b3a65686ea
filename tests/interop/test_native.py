import os

import jax
import numpy as np
import pytest

import afmkit
from afmkit.config import get_size
from afmkit.errors import CorruptFileError, ModelNotFoundError
from afmkit.interop import native
from afmkit.model.transformer import init_params


@pytest.fixture
def tiny(smollm2):
    config = get_size("test-tiny")
    return afmkit.LanguageModel(config, init_params(config, jax.random.PRNGKey(0)), smollm2.tokenizer)


def test_save_and_load_round_trip(tmp_path, tiny):
    tiny.save(tmp_path / "ckpt")
    loaded = afmkit.load(tmp_path / "ckpt")
    assert loaded.config == tiny.config
    np.testing.assert_array_equal(loaded.logits([1, 2, 3]), tiny.logits([1, 2, 3]))
    assert loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}]
    ) == tiny.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_a_model_with_a_default_adapter_saves_and_loads_with_it_applied(tmp_path, tiny):
    # e.g. smollm2-135m-afm (base + shipped adapter) saved to a folder must answer as it did.
    from afmkit.adapters.lora import LoraConfig, random_adapter

    adapter = random_adapter(tiny.config, LoraConfig(rank=4), jax.random.PRNGKey(1), b_std=0.05, name="tuned")
    adapted = tiny.with_adapter(adapter)
    adapted.save(tmp_path / "ckpt")
    loaded = afmkit.load(tmp_path / "ckpt")
    assert loaded.adapter is not None
    # The same fp16 A and B (their storage dtype) over the same fp32 weights: the same numbers.
    np.testing.assert_array_equal(loaded.logits([1, 2, 3]), adapted.logits([1, 2, 3]))
    assert np.abs(np.asarray(adapted.logits([1, 2, 3]) - tiny.logits([1, 2, 3]))).max() > 1e-2
    bare = afmkit.load(tmp_path / "ckpt", recovery=False)
    np.testing.assert_array_equal(bare.logits([1, 2, 3]), tiny.logits([1, 2, 3]))


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, tiny, monkeypatch):
    path = tmp_path / "ckpt"
    tiny.save(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.flax.save_file", broken_save)
    with pytest.raises(OSError):
        tiny.save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p for p in tmp_path.iterdir() if p.name != "ckpt"] == []  # no temporary left behind


def test_corrupt_weights_file_is_a_clear_error(tmp_path, tiny):
    tiny.save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="damaged"):
        afmkit.load(tmp_path / "ckpt")


def test_missing_path_and_unknown_name_say_what_is_known(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        afmkit.load("no-such-model")
    with pytest.raises(ModelNotFoundError, match="model size"):
        afmkit.load("afm-on-device")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="neither"):
        afmkit.load(empty)


def test_corrupt_gguf_is_a_clear_error(tmp_path, smollm2_gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(smollm2_gguf.read_bytes()[:5_000_000])
    with pytest.raises(CorruptFileError):
        afmkit.load(bad)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CorruptFileError):
        afmkit.load(junk)


def test_cached_conversion_is_reused_and_rebuilt_when_damaged(tmp_path, monkeypatch, smollm2_gguf):
    monkeypatch.setenv("AFMKIT_CACHE", str(tmp_path))
    first = afmkit.load(smollm2_gguf)
    (converted,) = (tmp_path / "converted").iterdir()
    assert native.is_checkpoint(converted)
    (converted / "model.safetensors").write_bytes(b"garbage")
    second = afmkit.load(smollm2_gguf)
    np.testing.assert_array_equal(second.logits([1, 2, 3]), first.logits([1, 2, 3]))


def test_a_bf16_first_load_does_not_round_the_cached_weights(tmp_path, monkeypatch, smollm2, smollm2_gguf):
    import jax.numpy as jnp

    monkeypatch.setenv("AFMKIT_CACHE", str(tmp_path))
    bf16 = afmkit.load(smollm2_gguf, dtype="bfloat16")
    assert bf16.params["embed"].dtype == jnp.bfloat16
    fp32 = afmkit.load(smollm2_gguf, dtype="float32")  # now from the cache the bf16 load wrote
    np.testing.assert_array_equal(np.asarray(fp32.params["embed"]), np.asarray(smollm2.params["embed"]))


def test_unreadable_tensor_entry_is_a_clear_error(tmp_path, tiny):
    import json
    import struct

    tiny.save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["embed"]["dtype"] = "F64"
    new_header = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(new_header) == length
    weights.write_bytes(data[:8] + new_header + data[8 + length :])
    with pytest.raises(CorruptFileError, match="unreadable entry"):
        afmkit.load(tmp_path / "ckpt")
