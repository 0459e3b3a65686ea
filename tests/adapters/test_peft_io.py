"""PEFT layout: afmkit adapters load with ``peft`` onto transformers' model of the same GGUF and give
the same logits; PEFT-made adapters load into afmkit with the same logits; bad adapters are refused."""

import json
import warnings

import jax
import numpy as np
import pytest
import torch
from float64_reference import SLACK, reference_logits, rounding_error

from afmkit.adapters.lora import LoraConfig, single
from afmkit.adapters.peft_io import AFMKIT_FILE, CONFIG_FILE, WEIGHTS_FILE, base_fingerprint, load_adapter, save_adapter
from afmkit.errors import CorruptFileError, UserError

PROMPT = "Summarize this: The committee met on Tuesday and agreed to fund the new library."


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


def _ours(model, ids, adapter=None):
    from afmkit.model.transformer import logits_fn

    return np.asarray(
        logits_fn(model.params, jax.numpy.asarray([ids]), config=model.config, adapters=adapter and single(adapter))
    )[0]


def _theirs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_afmkit_adapter_loads_in_peft_with_the_same_logits(smollm2, hf_model, tmp_path, make_adapter):
    from peft import PeftModel

    adapter = make_adapter(smollm2.config, LoraConfig(rank=16, layers=tuple(range(0, 30, 3))), seed=21, name="s")
    save_adapter(tmp_path / "s", adapter, config=smollm2.config, params=smollm2.params)
    ids = smollm2.tokenizer.encode(PROMPT)
    base = _theirs(hf_model, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "s").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]  # PEFT reads our config quietly
    try:
        theirs = _theirs(peft_model, ids)
    finally:
        peft_model.unload()
    assert np.abs(theirs - base).max() > 0.1  # the adapter matters on their side too
    # transformers + PEFT in fp32 is one more order of the same sums: within the rounding that
    # afmkit's own plain path makes of the exact (float64) logits (see float64_reference.py).
    exact = reference_logits(smollm2, np.array([ids, ids]), [None, adapter])
    rounding = max(
        rounding_error(_ours(smollm2, ids), exact[0]), rounding_error(_ours(smollm2, ids, adapter), exact[1])
    )
    assert rounding <= 0.01 * np.abs(exact[1] - exact[0]).max()
    assert rounding_error(base, exact[0]) <= SLACK * rounding
    assert rounding_error(theirs, exact[1]) <= SLACK * rounding  # PEFT applies the adapter as afmkit does


def test_peft_made_adapter_loads_into_afmkit_with_the_same_logits(smollm2, hf_model, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    config = PeftLoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
        layers_to_transform=[1, 5, 20],
        init_lora_weights=False,  # random B too, so the adapter changes the output
    )
    peft_model = get_peft_model(hf_model, config)
    with torch.no_grad():  # PEFT's random init is large; scale B to a trained-adapter size
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    ids = smollm2.tokenizer.encode(PROMPT)
    try:
        theirs = _theirs(peft_model, ids)
        peft_model.save_pretrained(tmp_path / "peft")
    finally:
        peft_model.unload()
    assert "afmkit" not in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    adapter = load_adapter(tmp_path / "peft", config=smollm2.config, params=smollm2.params)
    assert adapter.config.rank == 8 and set(adapter.config.targets) == {"q", "k", "o", "down"}
    assert [i for i, layer in enumerate(adapter.weights) if layer] == [1, 5, 20]
    # The exact logits with the adapter as afmkit read it; PEFT's own run of its adapter lands
    # within rounding of them only if afmkit read the layout right (see float64_reference.py).
    exact = reference_logits(smollm2, np.array([ids, ids]), [None, adapter])
    rounding = max(
        rounding_error(_ours(smollm2, ids), exact[0]), rounding_error(_ours(smollm2, ids, adapter), exact[1])
    )
    assert np.abs(exact[1] - exact[0]).max() > 0.1 and rounding <= 0.01 * np.abs(exact[1] - exact[0]).max()
    assert rounding_error(theirs, exact[1]) <= SLACK * rounding


def test_round_trip_is_exact_and_the_save_is_atomic(smollm2, tmp_path, make_adapter):
    adapter = make_adapter(smollm2.config, LoraConfig(rank=4, targets=("v", "up"), dtype="bfloat16"), seed=3)
    save_adapter(tmp_path / "a", adapter, config=smollm2.config, params=smollm2.params)
    loaded = load_adapter(tmp_path / "a", config=smollm2.config, params=smollm2.params)
    assert loaded.config.dtype == "bfloat16" and loaded.config.targets == ("v", "up")
    for x, y in zip(jax.tree.leaves(adapter.weights), jax.tree.leaves(loaded.weights)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary leftovers


def test_an_adapter_for_another_base_is_refused(smollm2, tmp_path, make_adapter):
    adapter = make_adapter(smollm2.config, LoraConfig(rank=4), seed=4)
    save_adapter(tmp_path / "a", adapter, config=smollm2.config, params=smollm2.params)
    other = jax.tree.map(lambda w: w * 1.01, smollm2.params)  # same shapes, different weights
    with pytest.raises(UserError, match="another base model"):
        load_adapter(tmp_path / "a", config=smollm2.config, params=other)


def test_foreign_shapes_and_corrupt_files_get_clear_errors(smollm2, tiny_model, tmp_path, make_adapter):
    adapter = make_adapter(tiny_model.config, LoraConfig(rank=4), seed=5)
    save_adapter(tmp_path / "tiny", adapter, config=tiny_model.config, params=tiny_model.params)
    with pytest.raises(UserError, match="another base model"):
        load_adapter(tmp_path / "tiny", config=smollm2.config)  # shapes only, as for a PEFT-made adapter
    (tmp_path / "tiny" / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CorruptFileError, match="damaged"):
        load_adapter(tmp_path / "tiny", config=tiny_model.config)
    with pytest.raises(UserError, match="adapter_config"):
        load_adapter(tmp_path / "missing", config=tiny_model.config)


def _peft_warnings(directory):
    from peft import PeftConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftConfig.from_pretrained(str(directory))
    return [str(w.message) for w in caught if "Unexpected keyword" in str(w.message)]


def _to_old_layout(directory):
    """An adapter as afmkit saved them before afmkit_adapter.json: its metadata under an
    ``afmkit`` key of adapter_config.json."""
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["afmkit"] = json.loads((directory / AFMKIT_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    (directory / AFMKIT_FILE).unlink()


def test_peft_reads_our_config_without_warnings_and_old_adapters_still_load(tiny_model, tmp_path, make_adapter):
    config, params = tiny_model.config, tiny_model.params
    adapter = make_adapter(config, LoraConfig(rank=4), seed=6, name="t")
    save_adapter(tmp_path / "t", adapter, config=config, params=params)
    assert "afmkit" not in json.loads((tmp_path / "t" / CONFIG_FILE).read_text())
    assert json.loads((tmp_path / "t" / AFMKIT_FILE).read_text())["base_fingerprint"] == base_fingerprint(
        config, params
    )
    assert _peft_warnings(tmp_path / "t") == []
    _to_old_layout(tmp_path / "t")
    assert _peft_warnings(tmp_path / "t")  # what users of adapters saved before saw
    loaded = load_adapter(tmp_path / "t", config=config, params=params)  # the old location is read ...
    np.testing.assert_array_equal(loaded.weights[0]["wq"]["b"], adapter.weights[0]["wq"]["b"])
    other = jax.tree.map(lambda w: w * 1.01, params)
    with pytest.raises(UserError, match="another base model"):  # ... and its fingerprint still checked
        load_adapter(tmp_path / "t", config=config, params=other)


def test_a_packed_base_is_fingerprinted_by_its_dequantized_values(tiny_model):
    """A packed weight's fingerprint reads its dequantized values at the sampled positions: the
    same as the fingerprint of the whole weight dequantized (an independent path), so a lossless
    pack matches the float load; a lossy pack (random fp32 weights to 4 bits) is another base."""
    from afmkit.model.packed import PackedWeight, pack_params

    config = tiny_model.config
    packed = pack_params(tiny_model.params, bits=4)
    dense = jax.tree.map(
        lambda w: w.dequantize() if isinstance(w, PackedWeight) else w,
        packed,
        is_leaf=lambda w: isinstance(w, PackedWeight),
    )
    assert base_fingerprint(config, packed) == base_fingerprint(config, dense)
    assert base_fingerprint(config, packed) != base_fingerprint(config, tiny_model.params)


@pytest.fixture(scope="module")
def smollm2_int4():
    import afmkit

    return afmkit.load("smollm2-135m-instruct", dtype="int4")


def test_adapters_move_between_the_fp32_and_int4_loads_of_smollm2(smollm2, smollm2_int4, tmp_path, make_adapter):
    """SmolLM2's int4 load holds exactly the GGUF's 4-bit weights, the fp32 load their exact
    dequantized values: the same model, so an adapter made on either loads onto the other."""
    adapter = make_adapter(smollm2.config, LoraConfig(rank=4, targets=("q", "down")), seed=8)
    for made_on, used_on in ((smollm2, smollm2_int4), (smollm2_int4, smollm2)):
        save_adapter(tmp_path / "a", adapter, config=made_on.config, params=made_on.params)
        loaded = load_adapter(tmp_path / "a", config=used_on.config, params=used_on.params)
        np.testing.assert_array_equal(loaded.weights[0]["wq"]["a"], adapter.weights[0]["wq"]["a"])
