"""Helpers shared by the post-training tests."""

import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture
def window_log_probs():
    """``compute(view, windows)``: float64 log-probabilities ``[windows, positions, vocab]`` of a
    ``ModelView`` on text windows (``tokens``, ``positions``, ``segment_ids``), from its logits."""

    def compute(view, windows):
        hidden = view.hidden(*(jnp.asarray(windows[f]) for f in ("tokens", "positions", "segment_ids")))
        z = np.asarray(view.logits(hidden), np.float64)
        z -= z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    return compute
