"""``afmkit compress recover --train tables|both`` on the small random model of test_recover:
training the palettized look-up tables (and per-row scales) lowers the KL to the float teacher on
held-out text, moves only table and scale values, saves a new model directory that loads as the
trained model, and its gradient is the table gradient a numpy transcription gives."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_recover import full_kl

import afmkit
from afmkit.cli import EXIT_USER_ERROR, main
from afmkit.compress.palettize import bits_per_weight
from afmkit.compress.recover import RECOVERY_DIR, RESULTS_FILE, PalettizedTables, recover
from afmkit.compress.settings import RecoverSettings
from afmkit.lm import LanguageModel
from afmkit.model.palettized import PalettizedWeight, from_codes, palettized_matmul

pytestmark = pytest.mark.usefixtures("private_cache")  # fixtures: tests/compress/conftest.py


def settings(models, **changes) -> RecoverSettings:
    common = dict(teacher=str(models / "float"), data=str(models / "train.txt"), batch=4, seq_len=64, top_k=16)
    return RecoverSettings(**{**common, "eval_rows": 2, "save_every": 0, **changes})


@pytest.fixture(scope="module")
def trained(models):
    """40 steps of table training, the settings test_recover's adapter is trained with."""
    out = models / "tables"
    results = recover(models / "small", settings(models, train="tables", out=str(out), steps=40, lr=1e-2), quiet=True)
    return out, results


def palettized(params) -> list[PalettizedWeight]:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, PalettizedWeight))
    return [w for w in leaves if isinstance(w, PalettizedWeight)]


def test_training_the_tables_lowers_kl_to_the_teacher_on_held_out_text(trained, models):
    out, _ = trained
    saved = json.loads((out / RESULTS_FILE).read_text())
    assert saved["steps_done"] == 40 and saved["settings"]["train"] == "tables"
    assert saved["held_out_kl_after"] < saved["held_out_kl_before"]
    teacher = afmkit.load(models / "float", dtype="float32")
    ids = teacher.tokenizer.encode((models / "held_out.txt").read_text())[:200]
    before = full_kl(teacher, afmkit.load(models / "small"), ids)
    after = full_kl(teacher, afmkit.load(out), ids)
    # The full-vocabulary KL on text training never read: lower by a clear margin, not by noise.
    assert after < 0.9 * before, (before, after)


def test_only_table_and_scale_values_move(trained, models):
    out, results = trained
    base, new = afmkit.load(models / "small"), afmkit.load(out)
    assert new.adapter is None and not (out / RECOVERY_DIR).exists()
    assert bits_per_weight(new.params) == bits_per_weight(base.params) == results["bits_per_weight"]
    is_leaf = lambda x: isinstance(x, PalettizedWeight)  # noqa: E731
    base_leaves, base_tree = jax.tree.flatten(base.params, is_leaf=is_leaf)
    new_leaves, new_tree = jax.tree.flatten(new.params, is_leaf=is_leaf)
    assert base_tree == new_tree
    moved = 0
    for was, now in zip(base_leaves, new_leaves):
        if isinstance(was, PalettizedWeight):
            assert (now.bits, now.shape, now.in_axes) == (was.bits, was.shape, was.in_axes)
            np.testing.assert_array_equal(np.asarray(now.indices), np.asarray(was.indices))
            assert now.tables.dtype == was.tables.dtype == jnp.float16 and now.scales.dtype == jnp.float16
            moved += int(np.any(np.asarray(now.tables) != np.asarray(was.tables)))
            moved += int(np.any(np.asarray(now.scales) != np.asarray(was.scales)))
        else:  # embeddings, norms: untouched
            np.testing.assert_array_equal(np.asarray(now), np.asarray(was))
    assert moved == 2 * len(palettized(base.params))  # every matrix's tables and scales trained
    # the compressed model itself is untouched
    assert not (models / "small" / RESULTS_FILE).exists()


def test_the_saved_model_is_the_trained_one(trained, models):
    out, results = trained
    base = afmkit.load(models / "small")
    subset = PalettizedTables.of(base.params)
    in_memory = LanguageModel(base.config, subset.params(results["weights"], base.params), base.tokenizer)
    loaded = afmkit.load(out)
    ids = loaded.tokenizer.encode((models / "held_out.txt").read_text())[:100]
    # the forward pass trains on fp16-rounded values, the values saved: the same logits, exactly
    np.testing.assert_array_equal(np.asarray(loaded.logits(ids)), np.asarray(in_memory.logits(ids)))


def test_both_trains_tables_and_an_adapter_saved_together(models):
    out = models / "both"
    recover(models / "small", settings(models, train="both", out=str(out), steps=2, seq_len=32), quiet=True)
    model = afmkit.load(out)  # the adapter's base fingerprint is the trained tables'
    assert model.adapter is not None and json.loads((out / RESULTS_FILE).read_text())["settings"]["train"] == "both"
    assert afmkit.load(out, recovery=False).adapter is None


def test_table_gradient_matches_a_numpy_transcription():
    """d/d tables and d/d scales of sum(G * (x @ W)) through ``palettized_matmul`` (the native
    kernel's XLA backward on CPUs), against float64 numpy."""
    rng = np.random.default_rng(0)
    k, n, m, bits = 16, 32, 3, 2
    codes = rng.integers(0, 2**bits, (k, n))
    tables = rng.standard_normal((n // 16, 2**bits)).astype(np.float16)
    scales = rng.uniform(0.5, 2.0, n).astype(np.float16)
    weight = from_codes(codes, tables, scales, bits=bits, shape=(k, n))
    x = rng.standard_normal((m, k)).astype(np.float32)
    g = rng.standard_normal((m, n)).astype(np.float32)

    def loss(tables, scales):
        w = PalettizedWeight(weight.indices, tables, scales, bits=bits, shape=(k, n), in_axes=(0,))
        return jnp.sum(jnp.asarray(g) * palettized_matmul(jnp.asarray(x), w))

    t32, s32 = jnp.asarray(tables, jnp.float32), jnp.asarray(scales, jnp.float32)
    got_tables, got_scales = jax.grad(loss, argnums=(0, 1))(t32, s32)

    d_w = x.astype(np.float64).T @ g.astype(np.float64)  # dL/dW [K, N]
    group = np.arange(n) // 16
    want_tables = np.zeros(tables.shape)
    np.add.at(want_tables, (np.broadcast_to(group, (k, n)), codes), d_w * scales.astype(np.float64))
    values = tables.astype(np.float64)[group[None, :], codes]  # the table value of each weight
    want_scales = (d_w * values).sum(axis=0)
    # fp32: each of at most m*k*16 = 768 products rounds once and every partial sum once, so the
    # error is below 769 * 2^-24 of the sum of the terms' magnitudes (the standard summation bound).
    bound = 769 * 2.0**-24
    mag_tables = np.zeros(tables.shape)
    np.add.at(mag_tables, (np.broadcast_to(group, (k, n)), codes), (np.abs(x).T @ np.abs(g)) * scales)
    mag_scales = ((np.abs(x).T @ np.abs(g)) * np.abs(values)).sum(axis=0)
    assert np.all(np.abs(np.asarray(got_tables) - want_tables) <= bound * mag_tables + 1e-30)
    assert np.all(np.abs(np.asarray(got_scales) - want_scales) <= bound * mag_scales + 1e-30)

    # The trained offsets are the tables in units of each group's largest magnitude and the
    # scales relative to their base: their gradients are the chain rule's of the above.
    params = {"w": weight}
    subset = PalettizedTables.of(params)
    offsets = subset.init(None, jax.random.PRNGKey(0))
    grads = jax.grad(
        lambda o: jnp.sum(jnp.asarray(g) * palettized_matmul(jnp.asarray(x), subset.params(o, params)["w"]))
    )(offsets)["tables"]["0"]
    magnitude = np.abs(tables.astype(np.float64)).max(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(grads["tables"]), np.asarray(got_tables) * magnitude, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads["scales"]), np.asarray(got_scales) * scales, rtol=1e-6)


def test_refusals_are_one_line(models, capsys):
    common = ["--model", str(models / "small"), "--teacher", str(models / "float"), "--data", str(models / "train.txt")]
    cases = [
        (["--train", "tables"], "give --out DIR"),
        (["--train", "both"], "give --out DIR"),
        (["--train", "tables", "--out", str(models / "small")], "is the compressed model itself"),
    ]
    for extra, message in cases:
        assert main(["compress", "recover", *common, *extra, "--quiet"]) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
