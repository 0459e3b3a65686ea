"""Hugging Face checkpoint directories: import one made by transformers, export one that
transformers reads, with logits compared against transformers each way."""

import jax
import numpy as np
import pytest
import torch

import afmkit
from afmkit.config import get_size
from afmkit.errors import CorruptFileError, UserError
from afmkit.interop.huggingface import save_hf_directory
from afmkit.model.transformer import init_params

IDS = [[3, 17, 250, 9, 88, 401, 5, 77, 123, 60]]


def _hf_logits(directory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _tokenizer_files(directory, smollm2):
    smollm2.tokenizer.save(directory)


def test_imports_an_untied_llama_checkpoint_written_by_transformers(tmp_path, smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(hf_config).save_pretrained(tmp_path, safe_serialization=True)
    _tokenizer_files(tmp_path, smollm2)
    model = afmkit.load(tmp_path)
    assert model.config.n_kv_heads == 2 and not model.config.tie_embeddings
    np.testing.assert_allclose(model.logits(IDS), _hf_logits(tmp_path), atol=1e-4)


def test_exported_qk_norm_model_matches_transformers(tmp_path, smollm2):
    config = get_size("test-tiny")  # q/k-norm on: exported as Qwen3, which has the same block
    params = init_params(config, jax.random.PRNGKey(3))
    # Non-trivial norm scales, so a misplaced norm would show.
    params["layers"][0]["q_norm"] = params["layers"][0]["q_norm"] * 1.7
    params["layers"][1]["k_norm"] = params["layers"][1]["k_norm"] * 0.6
    save_hf_directory(tmp_path, config, params)
    _tokenizer_files(tmp_path, smollm2)
    theirs = _hf_logits(tmp_path)
    ours = afmkit.LanguageModel(config, params, smollm2.tokenizer).logits(IDS)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    reloaded = afmkit.load(tmp_path)
    np.testing.assert_allclose(reloaded.logits(IDS), ours, atol=1e-6)


def test_unsupported_architectures_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10}')
    with pytest.raises(UserError, match="not supported"):
        afmkit.load(tmp_path)


def test_truncated_safetensors_is_reported_as_corrupt(tmp_path, smollm2):
    config = get_size("test-tiny")
    save_hf_directory(tmp_path, config, init_params(config, jax.random.PRNGKey(0)), smollm2.tokenizer)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError):
        afmkit.load(tmp_path)
