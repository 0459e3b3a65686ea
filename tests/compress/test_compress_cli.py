"""``afmkit compress palettize`` end to end on a small random model: the budget is met and
reported as the stored arrays count it, the model loads with ``afmkit.load``, the written recipe
reproduces the model through ``--recipe``, and bad input is one line each."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import afmkit
from afmkit.cli import EXIT_USER_ERROR, main
from afmkit.compress import sensitivity
from afmkit.compress.allocate import bits_per_weight
from afmkit.compress.cli import REPORT_FILE
from afmkit.config import get_size
from afmkit.files import packaged_data
from afmkit.interop import native
from afmkit.model.palettized import PalettizedWeight
from afmkit.model.transformer import init_params

CONFIG = dataclasses.replace(
    get_size("afm-tiny"), name="afm-micro", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128
)
CALIBRATION = str(packaged_data("tinyshakespeare/input_head.txt"))
SMALL = ["--calibration", CALIBRATION, "--calibration-tokens", "256", "--seq-len", "64"]


@pytest.fixture(scope="module")
def float_model(smollm2, tmp_path_factory):
    directory = tmp_path_factory.mktemp("micro") / "float"
    native.save_checkpoint(directory, CONFIG, init_params(CONFIG, jax.random.PRNGKey(3)), smollm2.tokenizer)
    return directory


pytestmark = pytest.mark.usefixtures("private_cache")  # tests/compress/conftest.py


def run(*argv):
    return main(["compress", "palettize", *map(str, argv)])


def test_budget_is_met_and_the_model_loads(float_model, tmp_path, capsys):
    out = tmp_path / "c"
    assert run("--model", float_model, "--bits-per-weight", 3, *SMALL, "--out", out, "--quiet") == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert 2.9 < report["bits_per_weight"] <= 3.0
    # allocate's accounting and the stored arrays agree
    assert report["bits_per_weight"] == pytest.approx(report["predicted_bits_per_weight"], rel=1e-12)
    assert set(report["seconds"]) >= {"load", "calibration", "analysis", "allocate", "palettize", "save", "total"}
    assert str(out) in capsys.readouterr().out

    model = afmkit.load(out)
    recipe = json.loads((out / "recipe.json").read_text())
    for name, bits in recipe["bits"].items():
        leaf = sensitivity.get_matrix(model.params, name)
        assert isinstance(leaf, PalettizedWeight) and leaf.bits == bits
    assert recipe["predicted"]["bits_per_weight"] == pytest.approx(
        bits_per_weight(sensitivity.matrix_shapes(model.params), recipe["bits"], group_rows=16, per_row_scale=True)
    )
    logits = model.logits(model.tokenizer.encode("To be, or not to be"))
    assert np.isfinite(logits).all()


def test_the_written_recipe_reproduces_the_model(float_model, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert run("--model", float_model, "--bits-per-weight", 2.5, *SMALL, "--out", first, "--quiet") == 0
    # a hand edit, as Talaria would make: one matrix to 8 bits
    recipe = json.loads((first / "recipe.json").read_text())
    recipe["bits"]["layers.1.w_down"] = 8
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(recipe))
    assert run("--model", float_model, "--recipe", edited, *SMALL, "--out", second, "--quiet") == 0
    a, b = afmkit.load(first), afmkit.load(second)
    assert sensitivity.get_matrix(b.params, "layers.1.w_down").bits == 8
    assert json.loads((second / REPORT_FILE).read_text())["analysis_cached"]  # the first run's analysis
    # every other matrix is the same palettized weight, bit for bit
    for name in recipe["bits"]:
        if name != "layers.1.w_down":
            x, y = sensitivity.get_matrix(a.params, name), sensitivity.get_matrix(b.params, name)
            np.testing.assert_array_equal(np.asarray(x.indices), np.asarray(y.indices))
            np.testing.assert_array_equal(np.asarray(x.tables), np.asarray(y.tables))


def one_line_error(capsys, *argv) -> str:
    assert run(*argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("afmkit: error:") and "\n" not in err
    return err


def test_refusals_are_one_line(float_model, tmp_path, capsys):
    common = ["--model", float_model, *SMALL, "--out", tmp_path / "x", "--quiet"]
    assert "must be positive" in one_line_error(capsys, *common, "--bits-per-weight", 0)
    assert "not both" in one_line_error(capsys, *common, "--bits-per-weight", 3, "--recipe", tmp_path / "r.json")
    assert "give --bits-per-weight" in one_line_error(capsys, *common)
    err = one_line_error(capsys, *common, "--bits-per-weight", 1.5)
    assert "no allocation has 1.5 bits per weight" in err and "(all 2-bit)" in err and "(all 8-bit)" in err

    good = tmp_path / "good"
    assert run("--model", float_model, "--bits-per-weight", 4, *SMALL, "--out", good, "--quiet") == 0
    recipe = json.loads((good / "recipe.json").read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**recipe, "model": {"name": "someone-else", "fingerprint": "0123"}}))
    assert "made for someone-else" in one_line_error(capsys, *common, "--recipe", other)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**recipe, "bits": {**recipe["bits"], "layers.7.wq": 4}}))
    assert "unknown matrix 'layers.7.wq'" in one_line_error(capsys, *common, "--recipe", unknown)
    assert "does not exist" in one_line_error(
        capsys,
        "--model",
        float_model,
        "--bits-per-weight",
        3,
        "--calibration",
        tmp_path / "nope.txt",
        "--out",
        tmp_path / "y",
    )
