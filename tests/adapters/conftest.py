"""Helpers for adapter tests: adapters with non-zero B, so they change the model's output."""

import jax
import jax.numpy as jnp
import pytest

from afmkit.adapters.lora import LoraAdapter, LoraConfig, init_adapter


def trained_like(config, lora: LoraConfig, seed: int, *, name: str = "", std: float = 0.005) -> LoraAdapter:
    """A fresh adapter whose B is random too (a freshly initialised one is a no-op)."""
    adapter = init_adapter(config, lora, jax.random.PRNGKey(seed), name=name)
    key = jax.random.PRNGKey(seed + 1000)
    for layer in adapter.weights:
        for ab in layer.values():
            key, sub = jax.random.split(key)
            ab["b"] = (std * jax.random.normal(sub, ab["b"].shape)).astype(ab["b"].dtype)
    return adapter


@pytest.fixture
def make_adapter():
    return trained_like


@pytest.fixture
def fp32():
    return jnp.float32
