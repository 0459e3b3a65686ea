"""Helpers for adapter tests: adapters with non-zero B, so they change the model's output."""

import jax
import pytest

from afmkit.adapters.lora import LoraAdapter, LoraConfig, random_adapter


def trained_like(config, lora: LoraConfig, seed: int, *, name: str = "", std: float = 0.005) -> LoraAdapter:
    return random_adapter(config, lora, jax.random.PRNGKey(seed), b_std=std, name=name)


@pytest.fixture
def make_adapter():
    return trained_like
