"""Shared fixtures. Several simulated CPU devices, so sharding tests run on any machine; this
must be set before JAX is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference models load from local files only
# No persistent XLA cache in tests (the test processes and the commands they start): a test then
# never depends on programs an earlier run or another CPU left in ~/.cache.
os.environ.setdefault("AFMKIT_NO_XLA_CACHE", "1")

import jax
import pytest

import afmkit
from afmkit.config import get_size
from afmkit.model.transformer import init_params


@pytest.fixture(scope="session")
def smollm2() -> afmkit.LanguageModel:
    """The embedded default model, SmolLM2-135M-Instruct, in fp32: the parity reference (the
    default on CPUs is the file's own 4-bit weights, ``dtype="int4"``)."""
    return afmkit.load("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_gguf():
    from afmkit.weights import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def tiny_model(smollm2) -> afmkit.LanguageModel:
    """A random afm-tiny (GQA, q/k-norm, tied embedding) with SmolLM2's tokenizer."""
    config = get_size("afm-tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    return afmkit.LanguageModel(config, params, smollm2.tokenizer, name="afm-tiny-random")


@pytest.fixture(scope="session")
def peaked_model(tiny_model) -> afmkit.LanguageModel:
    """The random tiny model with its logits scaled by 8 (the final norm's gain): a few dozen
    tokens carry most of each next-token distribution, as in a trained model, instead of all
    49,152 about equally."""
    params = {**tiny_model.params, "final_norm": tiny_model.params["final_norm"] * 8}
    return afmkit.LanguageModel(tiny_model.config, params, tiny_model.tokenizer, name="afm-tiny-peaked")
