"""``afmkit adapter mix``: one adapter whose update is a weighted sum of adapters' updates."""

import json

import numpy as np
import pytest

from afmkit.adapters.lora import INPUT_AXES, LoraConfig, mix
from afmkit.adapters.peft_io import load_adapter, save_adapter
from afmkit.cli import main
from afmkit.errors import UserError


def update64(weight, ab, scale):
    """scale * A @ B in float64, as a (fan-in, fan-out) matrix, and the same with |A| and |B|."""
    a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
    rank = a.shape[-1]
    a, b = a.reshape(-1, rank), b.reshape(rank, -1)
    return scale * a @ b, abs(scale) * np.abs(a) @ np.abs(b)


@pytest.fixture
def two_adapters(tiny_model, make_adapter):
    first = make_adapter(tiny_model.config, LoraConfig(rank=4, alpha=8.0, dtype="float32"), 1, std=0.02)
    second = make_adapter(tiny_model.config, LoraConfig(rank=8, alpha=32.0, dtype="float32"), 2, std=0.02)
    return first, second


def test_the_mixture_is_the_weighted_sum_of_the_updates(two_adapters):
    weights = (0.3, -1.7)
    mixed = mix(two_adapters, weights)
    assert (mixed.config.rank, mixed.config.scale) == (12, 1.0)
    for i, layer in enumerate(mixed.weights):
        assert set(layer) == set(INPUT_AXES)
        for weight, ab in layer.items():
            got, _ = update64(weight, ab, mixed.config.scale)
            want = sum(
                w * update64(weight, x.weights[i][weight], x.config.scale)[0] for x, w in zip(two_adapters, weights)
            )
            # The only rounding: each B block, times w * scale, is stored in float32 (half an ulp,
            # 2^-24 relative, per element), so each output is off by at most 2^-24 * sum |A| |B|.
            _, magnitude = update64(weight, ab, mixed.config.scale)
            assert np.all(np.abs(got - want) <= 2.0**-24 * magnitude + 1e-300), (i, weight)


def test_the_order_of_an_adapters_weights_does_not_matter(two_adapters):
    first, second = two_adapters
    want = mix([first, second], [0.5, 0.5])
    second.weights = [dict(reversed(list(layer.items()))) for layer in second.weights]  # as another reader may
    got = mix([first, second], [0.5, 0.5])
    for got_layer, want_layer in zip(got.weights, want.weights):  # each weight paired by name, not position
        for weight, ab in want_layer.items():
            for part in ("a", "b"):
                np.testing.assert_array_equal(np.asarray(got_layer[weight][part]), np.asarray(ab[part]))


def test_a_mixture_of_adapters_with_different_layouts_is_refused(tiny_model, make_adapter):
    all_targets = make_adapter(tiny_model.config, LoraConfig(rank=4), 1)
    attention = make_adapter(tiny_model.config, LoraConfig(rank=4, targets=("q", "v")), 2)
    with pytest.raises(UserError, match="different layers or weights"):
        mix([all_targets, attention], [0.5, 0.5])
    with pytest.raises(UserError, match="one weight each"):
        mix([all_targets, all_targets], [1.0])


def test_adapter_mix_command_writes_an_adapter_that_loads(tiny_model, two_adapters, tmp_path, capsys):
    checkpoint = tiny_model.save(tmp_path / "afm-tiny")
    paths = []
    for k, adapter in enumerate(two_adapters):
        paths.append(tmp_path / f"a{k}")
        save_adapter(paths[-1], adapter, config=tiny_model.config, params=tiny_model.params)
    out = tmp_path / "mixed"
    where = ["--model", str(checkpoint), "--dtype", "float32", "--adapters", f"{paths[0]},{paths[1]}"]
    assert main(["adapter", "mix", *where, "--weights", "0.25,0.75", "--out", str(out)]) == 0
    loaded = load_adapter(out, config=tiny_model.config, params=tiny_model.params)
    assert loaded.config.rank == 12
    assert json.loads((out / "mix.json").read_text())["weights"] == [0.25, 0.75]
    want = mix(two_adapters, (0.25, 0.75))
    for got_layer, want_layer in zip(loaded.weights, want.weights):
        for weight in want_layer:
            np.testing.assert_array_equal(np.asarray(got_layer[weight]["b"]), np.asarray(want_layer[weight]["b"]))

    # the output never replaces saved work, e.g. an input adapter
    before = (paths[0] / "adapter_model.safetensors").read_bytes()
    assert main(["adapter", "mix", *where, "--weights", "0.5,0.5", "--out", str(paths[0])]) != 0
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (paths[0] / "adapter_model.safetensors").read_bytes() == before

    bad = tmp_path / "bad"
    assert main(["adapter", "mix", *where, "--weights", "0.5", "--out", str(bad)]) != 0
    assert "one finite number per adapter" in capsys.readouterr().err
    assert not bad.exists()
