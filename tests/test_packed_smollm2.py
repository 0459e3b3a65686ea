"""SmolLM2 with packed weights (``dtype="int4"``): the GGUF's own 4-bit weights, decoded fast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afmkit
from afmkit import kernels
from afmkit.adapters.lora import LoraConfig, merge, random_adapter, single
from afmkit.errors import UserError
from afmkit.model.packed import PackedWeight


@pytest.fixture(scope="module")
def smollm2_int4():
    return afmkit.load("smollm2-135m-instruct", dtype="int4")


def test_int4_holds_exactly_the_weights_the_gguf_stores(smollm2, smollm2_int4):
    """The GGUF's Q4_1 matrices and Q8_0 embedding repack without loss: dequantized, every
    packed weight equals afmkit's fp32 dequantization of the file."""
    assert "int4-packed" in repr(smollm2_int4)
    packed = smollm2_int4.params
    assert packed["embed"].bits == 8
    np.testing.assert_array_equal(np.asarray(packed["embed"].dequantize()), np.asarray(smollm2.params["embed"]))
    for fp32_layer, packed_layer in zip(smollm2.params["layers"], packed["layers"]):
        for name, weight in packed_layer.items():
            if isinstance(weight, PackedWeight):
                assert weight.bits == 4
                np.testing.assert_array_equal(np.asarray(weight.dequantize()), np.asarray(fp32_layer[name]))
            else:  # norm scales stay fp32
                np.testing.assert_array_equal(np.asarray(weight), np.asarray(fp32_layer[name]))


def test_int4_predicts_what_fp32_predicts(smollm2, smollm2_int4):
    ids = smollm2.tokenizer.encode(
        "The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is"
    )
    reference, packed = smollm2.logits(ids), smollm2_int4.logits(ids)
    # Activations may be rounded to bf16 at the matmuls; the bf16 engine differs from fp32 by
    # ~0.06 on average here too.
    assert np.abs(packed - reference).mean() < 0.08
    assert (packed.argmax(-1) == reference.argmax(-1)).mean() >= 0.95
    answer = smollm2_int4.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
    assert "Paris" in answer.text


@pytest.mark.skipif(not kernels.available(), reason="batch invariance is the native kernel's; XLA's matmul may differ")
def test_int4_generates_the_same_text_alone_and_in_a_batch(smollm2_int4):
    prompts = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", "Water boils at"]
    alone = smollm2_int4.generate(prompts[0], max_new_tokens=24)
    batched = smollm2_int4.generate(prompts, max_new_tokens=24)
    assert batched[0].tokens == alone.tokens


def test_packed_weights_save_as_their_values_and_refuse_to_be_merged(smollm2, smollm2_int4, tmp_path):
    """The default model is packed, so save() must work on it: the checkpoint holds the fp32
    values the codes stand for (the GGUF's own), and packing them again gives the same codes."""
    smollm2_int4.save(tmp_path / "packed")
    reloaded = afmkit.load(tmp_path / "packed", dtype="float32")
    np.testing.assert_array_equal(np.asarray(reloaded.params["layers"][3]["wq"]), smollm2.params["layers"][3]["wq"])
    repacked = afmkit.load(tmp_path / "packed", dtype="int4").params["layers"][3]["w_down"]
    original = smollm2_int4.params["layers"][3]["w_down"]
    np.testing.assert_array_equal(np.asarray(repacked.packed), np.asarray(original.packed))
    np.testing.assert_array_equal(np.asarray(repacked.scales), np.asarray(original.scales))
    adapter = random_adapter(smollm2_int4.config, LoraConfig(rank=4), jax.random.PRNGKey(0))
    with pytest.raises(UserError, match="packed"):
        merge(smollm2_int4.params, adapter)


def test_unknown_dtype_lists_the_packed_formats():
    with pytest.raises(UserError, match="int4"):
        afmkit.load("smollm2-135m-instruct", dtype="int3")


def test_an_adapter_applies_on_a_packed_base(smollm2, smollm2_int4):
    """LoRA updates add to the packed matmuls unmerged: the adapter moves int4 logits the way it
    moves fp32 logits, and generation with it runs."""
    from afmkit.infer.engine import activation_dtype
    from afmkit.model.transformer import logits_fn

    adapter = random_adapter(smollm2.config, LoraConfig(rank=8), jax.random.PRNGKey(1), b_std=0.05)
    tokens = jnp.asarray([smollm2.tokenizer.encode("Adapters specialise a base model for one task.")])

    def logits(model, with_adapter):
        return np.asarray(
            logits_fn(
                model.params,
                tokens,
                config=model.config,
                activation_dtype=activation_dtype(model.params),
                adapters=single(adapter) if with_adapter else None,
            )
        )

    shift_fp32 = logits(smollm2, True) - logits(smollm2, False)
    shift_int4 = logits(smollm2_int4, True) - logits(smollm2_int4, False)
    assert np.abs(shift_fp32).mean() > 0.5  # the adapter matters
    assert np.abs(shift_int4 - shift_fp32).mean() < 0.2 * np.abs(shift_fp32).mean()
    assert smollm2_int4.generate("Hello", adapter=adapter, max_new_tokens=4).tokens


# -- the default format ------------------------------------------------------------------------


def _write_gguf(path, matrix_type: str):
    """A GGUF file with metadata of every shape a reader must skip (strings, arrays of strings and
    of numbers) and one 2-D layer matrix stored as ``matrix_type``."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_uint32("llama.block_count", 1)
    writer.add_token_list(["a", "bb", "ccc"])
    writer.add_array("test.numbers", [1.5, 2.5])
    kind = gguf.GGMLQuantizationType[matrix_type]
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    writer.add_tensor("blk.0.attn_q.weight", quantize(weight, kind), raw_dtype=kind if matrix_type[0] == "Q" else None)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.add_tensor(
        "token_embd.weight", quantize(weight, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("matrix_type, bits", [("Q4_0", 4), ("Q8_0", 8), ("F16", None), ("F32", None)])
def test_the_header_reader_agrees_with_the_gguf_package(tmp_path, matrix_type, bits):
    import gguf

    from afmkit.interop.gguf_types import matrix_bits, tensor_types

    path = _write_gguf(tmp_path / "tiny.gguf", matrix_type)
    assert tensor_types(path) == {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert matrix_bits(path) == bits


def test_smollm2_loads_at_its_own_bits_by_default_on_cpus(smollm2_gguf, monkeypatch):
    """SmolLM2's file stores 4-bit matrices: the CPU default is int4 (with the kernels; without
    them XLA would dequantize every matrix at every step, so fp32), float32 one argument away."""
    from afmkit.lm import default_dtype

    assert default_dtype() == jnp.float32  # no file: nothing quantized to keep
    if kernels.available():
        assert default_dtype(smollm2_gguf) == "int4"
        model = afmkit.load("smollm2-135m-instruct")
        assert "int4-packed" in repr(model)
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert default_dtype(smollm2_gguf) == jnp.float32
    assert "float32" in repr(afmkit.load("smollm2-135m-instruct", dtype="float32"))


@pytest.mark.parametrize("matrix_type, expected", [("Q4_1", "int4"), ("Q8_0", "int8"), ("F16", "float32")])
def test_a_gguf_file_keeps_its_own_bits_by_default(tmp_path, monkeypatch, matrix_type, expected):
    from afmkit.lm import default_dtype

    monkeypatch.setattr(kernels, "available", lambda: True)
    got = default_dtype(_write_gguf(tmp_path / "tiny.gguf", matrix_type))
    assert got == (jnp.float32 if expected == "float32" else expected)
