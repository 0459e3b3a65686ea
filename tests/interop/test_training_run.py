"""A pre-training run is a model: ``afmkit.load`` and every ``--model`` take the run directory
(its latest checkpoint) or one step, read only the weights, and refuse a missing step or an
empty run with one line."""

import json
import shutil

import jax
import numpy as np
import pytest

import afmkit
from afmkit.cli import main
from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.lm import load_config


def trainer_restored_params(run, step):
    """The step's weights as the trainer's own resume path restores them (weights, optimizer
    state, step and RNG together): the reference the params-only load must equal."""
    from afmkit.train.checkpoint import Checkpoints
    from afmkit.train.optim import OptimizerConfig, build_optimizer
    from afmkit.train.step import abstract_state

    settings = json.loads((run / "run.json").read_text())
    config = ModelConfig.from_dict(settings["config"])
    optimizer = build_optimizer(
        OptimizerConfig(name=settings["settings"]["optimizer"], peak_lr=1e-3, warmup_steps=1, total_steps=4)
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_state(config, optimizer)
    )
    checkpoints = Checkpoints(run / "checkpoints", async_save=False)
    try:
        state, _ = checkpoints.restore(step, target.as_dict())
    finally:
        checkpoints.close()
    return state["params"]


def assert_same_weights(params, reference):
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_run_directory_loads_its_latest_step(pretrained_run):
    model = afmkit.load(pretrained_run)
    assert model.name == "run-step4"
    assert model.config == load_config(pretrained_run)
    assert_same_weights(model.params, trainer_restored_params(pretrained_run, 4))
    assert model.tokenizer.eos_token == "<|endoftext|>"  # the run's own tokenizer, from run.json


def test_a_chosen_step_loads_that_step(pretrained_run):
    step2 = afmkit.load(pretrained_run / "checkpoints" / "2")
    assert step2.name == "run-step2"
    assert_same_weights(step2.params, trainer_restored_params(pretrained_run, 2))
    latest = afmkit.load(pretrained_run / "checkpoints")
    assert not np.array_equal(np.asarray(step2.params["embed"]), np.asarray(latest.params["embed"]))


def test_a_run_loads_packed(pretrained_run):
    model = afmkit.load(pretrained_run, dtype="int8")
    assert "int8-packed" in repr(model)


def test_a_missing_step_names_the_saved_ones(pretrained_run):
    with pytest.raises(UserError, match=r"no checkpoint for step 3; saved steps: 2, 4") as error:
        afmkit.load(pretrained_run / "checkpoints" / "3")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"named by its step number.*2, 4"):
        afmkit.load(pretrained_run / "checkpoints" / "latest")


def test_a_run_without_checkpoints_is_refused(pretrained_run, tmp_path):
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(pretrained_run / "run.json", empty / "run.json")
    with pytest.raises(UserError, match="has no saved checkpoint yet"):
        afmkit.load(empty)


def test_generate_takes_a_run(pretrained_run, capsys):
    status = main(["generate", "--model", str(pretrained_run), "--prompt", "def ", "--max-new-tokens", "4", "--json"])
    assert status == 0
    reply = json.loads(capsys.readouterr().out)
    expected = afmkit.load(pretrained_run).generate("def ", max_new_tokens=4, temperature=0.0)
    assert reply["text"] == expected.text


def test_a_missing_step_is_one_line_on_the_command_line(pretrained_run, capsys):
    status = main(["generate", "--model", str(pretrained_run / "checkpoints" / "9"), "--prompt", "x"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert "saved steps: 2, 4" in err and "\n" not in err


def test_a_run_carries_its_tokenizer(pretrained_run, tmp_path):
    """The run keeps a copy of its tokenizer, so it loads even when the tokenizer it was trained
    with (a relative path, a folder since deleted) cannot be found from here."""
    import json
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(pretrained_run, copy)
    record = json.loads((copy / "run.json").read_text())
    record["settings"]["tokenizer"] = "no/such/tokenizer"
    (copy / "run.json").write_text(json.dumps(record))
    assert afmkit.load(copy).tokenizer.encode("def f():") == afmkit.load(pretrained_run).tokenizer.encode("def f():")
