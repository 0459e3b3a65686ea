"""Fixtures of the compression tests: a private cache, and the micro model pair that recovery
(adapter or tables) trains on."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from afmkit.compress.palettize import palettize_params
from afmkit.config import get_size
from afmkit.files import packaged_data
from afmkit.interop import native
from afmkit.model.transformer import init_params

MICRO_CONFIG = dataclasses.replace(
    get_size("afm-tiny"), name="afm-micro", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128
)
MICRO_TEXT = packaged_data("tinyshakespeare/input_head.txt")


@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    """A cache of the test's own (compressed models, sensitivities), so no test reads another's."""
    monkeypatch.setenv("AFMKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(smollm2, tmp_path_factory):
    """A float micro model (the teacher) and its 2-bit palettized copy (the student) in one
    folder, with the text to distil on (the first 60% of the file) and the held-out rest."""
    root = tmp_path_factory.mktemp("recover")
    params = init_params(MICRO_CONFIG, jax.random.PRNGKey(3))
    native.save_checkpoint(root / "float", MICRO_CONFIG, params, smollm2.tokenizer)
    compressed = palettize_params(jax.tree.map(np.asarray, params), 2)
    native.save_checkpoint(root / "small", MICRO_CONFIG, compressed, smollm2.tokenizer)
    text = MICRO_TEXT.read_text()
    cut = int(len(text) * 0.6)
    (root / "train.txt").write_text(text[:cut])
    (root / "held_out.txt").write_text(text[cut:])
    return root
