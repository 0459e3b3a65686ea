"""The recipe file: a round trip, and one line for each way a recipe can be wrong."""

from __future__ import annotations

import json

import pytest

from afmkit.compress.recipe import Recipe, bits_by_type, read_recipe
from afmkit.errors import UserError

MATRICES = [f"layers.{i}.{k}" for i in range(2) for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
FINGERPRINT = "a1b2c3"


def recipe(**changes):
    base = Recipe(
        model_name="tiny",
        fingerprint=FINGERPRINT,
        bits={name: 2 if name.endswith("w_gate") else 4 for name in MATRICES},
        calibration={"file": "cal.txt", "sha256": "00", "tokens": 1024},
        predicted={"bits_per_weight": 3.5},
    ).to_dict()
    base.update(changes)
    return base


def write(tmp_path, data, name="r.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def read(path):
    return read_recipe(path, fingerprint=FINGERPRINT, matrices=MATRICES, model_name="tiny")


def test_round_trip(tmp_path):
    original = Recipe(model_name="tiny", fingerprint=FINGERPRINT, bits=dict.fromkeys(MATRICES, 3), embed_bits=4)
    loaded = read(original.save(tmp_path / "r.json"))
    assert loaded == original
    assert bits_by_type(loaded.bits)["w_down"] == {3: 2}


def bad_bits(name, value):
    data = recipe()
    data["bits"][name] = value
    return data


def without(name):
    data = recipe()
    del data["bits"][name]
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a recipe is a JSON object"),
        (recipe(format="something-else"), "not an afmkit compression recipe"),
        (recipe(model={"name": "other-model", "fingerprint": "ffff"}), "made for other-model"),
        (bad_bits("layers.9.wq", 4), "unknown matrix 'layers.9.wq'"),
        (without("layers.1.w_up"), "no bit width for 'layers.1.w_up'"),
        (bad_bits("layers.0.wq", 5), "layers.0.wq has bit width 5; use one of 2, 3, 4, 8"),
        (bad_bits("layers.0.wq", "4"), "layers.0.wq has bit width '4'"),
        (bad_bits("layers.0.wq", True), "has bit width True"),
        (recipe(embed_bits=2), '"embed_bits" must be one of (4, 8)'),
        (recipe(group_rows=0), '"group_rows" must be a positive integer'),
        (recipe(per_row_scale="yes"), '"per_row_scale" must be true or false'),
    ],
)
def test_each_bad_recipe_is_refused_with_one_line(tmp_path, data, expected):
    path = write(tmp_path, data)
    with pytest.raises(UserError) as err:
        read(path)
    message = str(err.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read(tmp_path / "nope.json")
