"""``load(..., activations="int8")`` / ``--activations int8`` on a compressed model: every palettized
matrix quantizes its input per token, the CLI reports the same perplexity as the API, and a model
without palettized weights is refused in a line. (The matmul itself, kernel and XLA paths, is checked
to the bit against numpy in tests/model/test_palettized_int8.py.)"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import afmkit
from afmkit.cli import EXIT_USER_ERROR, main
from afmkit.errors import UserError
from afmkit.eval.perplexity import perplexity_of_text
from afmkit.model.palettized import PalettizedWeight

pytestmark = pytest.mark.usefixtures("private_cache")  # fixtures: tests/compress/conftest.py


def palettized_leaves(model):
    leaves = jax.tree.leaves(model.params, is_leaf=lambda leaf: isinstance(leaf, PalettizedWeight))
    return [leaf for leaf in leaves if isinstance(leaf, PalettizedWeight)]


def test_int8_activations_quantize_every_palettized_matmul(models):
    plain = afmkit.load(models / "small")
    int8 = afmkit.load(models / "small", activations="int8")
    assert {leaf.activation_bits for leaf in palettized_leaves(int8)} == {8}
    assert {leaf.activation_bits for leaf in palettized_leaves(plain)} == {None}
    ids = plain.tokenizer.encode((models / "held_out.txt").read_text())[:96]
    quantized = np.asarray(int8.logits(ids))
    assert np.isfinite(quantized).all()
    assert not np.array_equal(quantized, np.asarray(plain.logits(ids)))


def test_the_flag_gives_the_apis_perplexity_and_generation_runs(models, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text((models / "held_out.txt").read_text()[:2000])
    flags = ["eval", "perplexity", "--model", str(models / "small"), "--text", str(text), "--seq-len", "64"]
    assert main([*flags, "--stride", "32", "--activations", "int8", "--json"]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    model = afmkit.load(models / "small", activations="int8")
    expected = perplexity_of_text(model, text.read_text(), seq_len=64, stride=32).perplexity
    assert reported == pytest.approx(expected, rel=1e-6)
    plain = perplexity_of_text(afmkit.load(models / "small"), text.read_text(), seq_len=64, stride=32).perplexity
    # 8 bits per activation on top of 2-bit weights: a small change, not a broken model
    assert abs(reported / plain - 1) < 0.05, (reported, plain)
    assert len(model.generate("To be, or not", max_new_tokens=6, temperature=0.0).tokens) == 6


def test_a_model_without_palettized_weights_is_refused_in_one_line(models, capsys):
    with pytest.raises(UserError, match="has none"):
        afmkit.load(models / "float", activations="int8")
    with pytest.raises(UserError, match="unknown activations"):
        afmkit.load(models / "small", activations="int4")
    argv = ["generate", "--model", str(models / "float"), "--activations", "int8", "--prompt", "hello"]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "palettized" in err and len(err.splitlines()) == 1, err
