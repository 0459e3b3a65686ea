"""``afmkit export``: Hugging Face directories that transformers runs, and GGUF files that
transformers' own GGUF reader runs, each with the same logits as afmkit; refusals for what a
format cannot express. llama.cpp itself: ``test_llama_cpp.py`` (slow)."""

import json
import math

import jax
import numpy as np
import pytest
import torch

import afmkit
from afmkit.cli import main
from afmkit.config import get_size
from afmkit.errors import UserError
from afmkit.interop.export import export_model, float_params
from afmkit.interop.huggingface import params_from_hf_tensors, params_to_hf_tensors
from afmkit.model.transformer import init_params

FP32_UNIT_ROUNDOFF = 2.0**-24


def reorder_tolerance(config, logits):
    """How far two correct fp32 implementations of the same model may disagree.

    Only the order of floating-point sums differs (weights are bit-identical). A length-K dot
    product's rounding error is a random walk of about sqrt(K) * u relative to its magnitude; the
    residual stream passes about 2 * n_layers such matmul stages, whose independent errors add
    in quadrature; both implementations contribute (sqrt(2)); the result scales with the logits.
    For SmolLM2 (30 layers, K = 1536, |logits| <= 35) this is 9e-4, inside the 1e-3 the export
    must meet; for test-tiny about 1e-5.
    """
    k = max(config.d_model, config.d_ff, config.n_heads * config.head_dim)
    return math.sqrt(2) * float(np.abs(logits).max()) * math.sqrt(2 * config.n_layers * k) * FP32_UNIT_ROUNDOFF


def transformers_logits(directory, ids, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def smollm2_f32():
    return afmkit.load("smollm2-135m-instruct", dtype="float32")


# -- safetensors -----------------------------------------------------------------------------


def test_smollm2_exports_to_a_directory_transformers_runs_with_the_same_logits(tmp_path, smollm2_f32):
    from transformers import AutoTokenizer

    out = tmp_path / "smollm2-hf"
    assert main(["export", "--format", "safetensors", "--out", str(out)]) == 0  # the default model
    text = "The capital of France is Paris, and 12345 + 7 ="
    ids = smollm2_f32.tokenizer.encode(text)
    ours = smollm2_f32.logits(ids)
    tolerance = reorder_tolerance(smollm2_f32.config, ours)
    assert tolerance <= 1e-3
    np.testing.assert_allclose(transformers_logits(out, ids), ours, rtol=0, atol=tolerance)
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == ids
    generation = json.loads((out / "generation_config.json").read_text())
    assert smollm2_f32.tokenizer.token_id("<|im_end|>") in generation["eos_token_id"]


def test_a_pretrained_run_exports_to_transformers(tmp_path, pretrained_run):
    out = tmp_path / "tiny-hf"
    assert main(["export", "--model", str(pretrained_run), "--format", "safetensors", "--out", str(out)]) == 0
    model = afmkit.load(pretrained_run)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"  # test-tiny has q/k-norm
    ids = model.tokenizer.encode("def glob(pathname, *, root_dir=None):\n    return 42")
    ours = model.logits(ids)
    np.testing.assert_allclose(transformers_logits(out, ids), ours, rtol=0, atol=reorder_tolerance(model.config, ours))


def test_f16_safetensors_hold_the_weights_rounded_to_f16(tmp_path, pretrained_run):
    model = afmkit.load(pretrained_run)
    out = tmp_path / "tiny-f16"
    export_model(model, out, fmt="safetensors", dtype="f16")
    rounded = jax.tree.map(lambda w: np.asarray(w).astype(np.float16).astype(np.float32), float_params(model.params))
    ids = model.tokenizer.encode("for name in names:")
    ours = afmkit.LanguageModel(model.config, rounded, model.tokenizer).logits(ids)
    np.testing.assert_allclose(transformers_logits(out, ids), ours, rtol=0, atol=reorder_tolerance(model.config, ours))


def test_a_packed_model_is_exported_with_its_dequantized_values(tmp_path, pretrained_run):
    from safetensors.numpy import load_file

    model = afmkit.load(pretrained_run, dtype="int8")
    export_model(model, tmp_path / "packed-hf", fmt="safetensors")
    stored = load_file(str(tmp_path / "packed-hf" / "model.safetensors"))
    expected = dict(params_to_hf_tensors(model.config, float_params(model.params)))
    wq = stored["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(wq, expected["model.layers.0.self_attn.q_proj.weight"])
    unpacked = afmkit.load(pretrained_run, dtype="float32").params["layers"][0]["wq"]
    assert not np.array_equal(np.asarray(model.params["layers"][0]["wq"].dequantize()), np.asarray(unpacked))


def test_features_transformers_lacks_are_refused_in_one_line(tmp_path, smollm2_f32):
    config = get_size("test-tiny").replace(qk_norm_position="after_rope")
    model = afmkit.LanguageModel(config, init_params(config, jax.random.PRNGKey(0)), smollm2_f32.tokenizer)
    with pytest.raises(UserError, match=r"q/k-norm after RoPE") as error:
        export_model(model, tmp_path / "out", fmt="safetensors")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_bad_export_requests_fail_before_loading(tmp_path, pretrained_run, capsys):
    cases = [
        (["--model", str(pretrained_run), "--format", "gguf", "--out", str(tmp_path / "t.gguf")], "q/k-norm"),
        (["--format", "safetensors", "--dtype", "q8_0", "--out", str(tmp_path / "d")], "q8_0 is a GGUF type"),
        (["--format", "gguf", "--out", str(tmp_path / "model.bin")], "suffix"),
        (["--format", "safetensors", "--out", str(tmp_path)], "already exists"),
        (["--model", str(pretrained_run / "checkpoints" / "7"), "--format", "gguf", "--out", "x.gguf"], "2, 4"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- GGUF ------------------------------------------------------------------------------------


def q8_0_rounding(w):
    """ggml's Q8_0, transcribed from its reference quantizer (``quantize_row_q8_0_ref``): blocks
    of 32 consecutive values along each row; in fp32, d = max|x| / 127 and codes =
    roundf(x * (1 / d)) (halves away from zero); d stored as f16 and multiplied back."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    scaled = np.abs(blocks * inverse)
    whole = np.floor(scaled)
    codes = np.sign(blocks) * (whole + (scaled - whole >= 0.5))
    return (codes * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


FORMAT_ROUNDING = {
    "f32": lambda w: w,
    "f16": lambda w: w.astype(np.float16).astype(np.float32),
    "q8_0": q8_0_rounding,
}


@pytest.fixture(scope="module")
def small_llama(smollm2_f32):
    """A random Llama-shaped model (GQA, separate output matrix, non-unit norm scales) with
    SmolLM2's tokenizer: every kind of GGUF tensor, small enough to export three times."""
    config = get_size("smollm2-135m").replace(
        name="small-llama",
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        d_ff=256,
        tie_embeddings=False,
    )
    params = init_params(config, jax.random.PRNGKey(7))
    keys = iter(jax.random.split(jax.random.PRNGKey(8), 8))
    for layer in params["layers"]:
        for name in ("attn_norm", "mlp_norm"):
            layer[name] = layer[name] * jax.random.uniform(next(keys), layer[name].shape, minval=0.5, maxval=1.5)
    return afmkit.LanguageModel(config, params, smollm2_f32.tokenizer)


@pytest.fixture(scope="module")
def small_llama_ggufs(tmp_path_factory, small_llama):
    directory = tmp_path_factory.mktemp("gguf")
    return {
        dtype: export_model(small_llama, directory / f"small-{dtype}.gguf", fmt="gguf", dtype=dtype)
        for dtype in FORMAT_ROUNDING
    }


@pytest.mark.parametrize("dtype", list(FORMAT_ROUNDING))
def test_gguf_export_runs_in_transformers_with_the_formats_rounding(small_llama, small_llama_ggufs, dtype):
    path = small_llama_ggufs[dtype]
    config, tokenizer = small_llama.config, small_llama.tokenizer
    # afmkit on the weights rounded as the format defines (matrices only; norms stay f32): what
    # remains between the two is the order of fp32 sums.
    hf = {
        name: (FORMAT_ROUNDING[dtype](w) if w.ndim == 2 else w)
        for name, w in params_to_hf_tensors(config, small_llama.params)
    }
    rounded = params_from_hf_tensors(config, hf.__getitem__)
    ids = tokenizer.encode("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n")
    ours = afmkit.LanguageModel(config, rounded, tokenizer).logits(ids)
    theirs = transformers_logits(path.parent, ids, gguf_file=path.name)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=reorder_tolerance(config, ours))
    reloaded = afmkit.load(path, dtype="float32")  # afmkit's own importer is the inverse of the exporter
    np.testing.assert_allclose(reloaded.logits(ids), ours, rtol=0, atol=reorder_tolerance(config, ours))


def test_gguf_tokenizer_metadata_matches_the_original_file(small_llama_ggufs, smollm2_gguf):
    from afmkit.interop.gguf import read_gguf

    _, exported, _ = read_gguf(small_llama_ggufs["f16"])
    _, original, _ = read_gguf(smollm2_gguf)
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "add_bos_token"):
        assert exported[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    assert exported["tokenizer.chat_template"] == original["tokenizer.chat_template"]
    assert exported["general.architecture"] == "llama" and exported["general.file_type"] == 1  # MOSTLY_F16


def test_rope_row_permutation_is_the_inverse_of_the_import():
    from afmkit.interop.gguf import _permute_rope_rows, _unpermute_rope_rows

    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    permuted = _permute_rope_rows(w, 6)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(_unpermute_rope_rows(permuted, 6), w)
