"""``afmkit pretrain``'s flags against ``PretrainConfig``, the one source of its defaults: no flag
carries a default of its own, the help texts quote the dataclass, a recipe fills in what the
flags leave unset, and the printed resume command parses back to the same run."""

import dataclasses
import shlex

import pytest

from afmkit.cli import build_parser
from afmkit.train.cli import config_from_args
from afmkit.train.settings import NOT_ON_CLI, RECIPES, PretrainConfig, resume_command


def pretrain_parser():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return parser, commands.choices["pretrain"]


def parse(*argv):
    parser, _ = pretrain_parser()
    return config_from_args(parser.parse_args(["pretrain", *argv]))


def test_no_flags_give_exactly_the_dataclass_defaults():
    assert parse("--out", "runs/x") == PretrainConfig(out="runs/x")


def test_every_setting_is_a_flag_and_its_help_quotes_the_dataclass_default():
    _, sub = pretrain_parser()
    actions = {a.dest: a for a in sub._actions}
    defaults = PretrainConfig(out="")
    for field in dataclasses.fields(PretrainConfig):
        if field.name in NOT_ON_CLI:
            continue
        action = actions[field.name]  # every setting has a flag
        assert action.help, f"--{field.name} has no help text"
        if action.option_strings and not isinstance(getattr(defaults, field.name), bool):
            assert action.default is None, f"--{field.name} has a default of its own: {action.default!r}"
        value = getattr(defaults, field.name)
        if value is not None and not isinstance(value, bool) and field.name != "out":
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            assert f"default {shown}" in action.help, (field.name, action.help)


def test_a_recipe_fills_unset_flags_and_explicit_flags_win():
    config = parse("--out", "o", "--recipe", "afm-core", "--lr", "0.005")
    recipe = RECIPES["afm-core"]
    assert config.optimizer == "afm" == recipe["optimizer"]
    assert config.lr == 0.005  # explicit
    assert (config.final_lr_fraction, config.weight_decay) == (0.005, 3.16e-4)  # AFM_SPEC section 3
    assert (config.batch, config.seq_len) == (recipe["batch"], recipe["seq_len"])
    assert parse("--out", "o", "--recipe", "afm-core") == PretrainConfig.from_recipe("afm-core", out="o")


def test_the_resume_command_parses_back_to_the_same_run():
    config = parse(
        "--out", "runs/my run", "--recipe", "afm-core", "--data", "a.txt", "b dir", "--steps", "300",
        "--mesh", "data=2,fsdp=2,tensor=2", "--seed", "3", "--eval-every", "10",
    )  # fmt: skip
    command = resume_command(config)
    words = shlex.split(command)
    assert words[:2] == ["afmkit", "pretrain"] and words[-1] == "--resume"
    assert parse(*words[2:]) == dataclasses.replace(config, resume=True)


def test_seed_and_shard_plan_optimizer_have_help():
    _, sub = pretrain_parser()
    assert "data order" in next(a for a in sub._actions if a.dest == "seed").help
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    optimizer = next(a for a in commands.choices["shard-plan"]._actions if a.dest == "optimizer")
    assert "afm" in optimizer.help and "state" in optimizer.help


def test_an_unknown_recipe_is_a_clear_error():
    from afmkit.errors import UserError

    with pytest.raises(UserError, match="unknown recipe 'afm-huge'; known recipes: afm-core"):
        PretrainConfig.from_recipe("afm-huge", out="o")


def test_the_optimizer_config_defaults_come_from_the_same_dataclass():
    from afmkit.train.optim import OptimizerConfig

    run, optimizer = PretrainConfig(out="").resolved(), OptimizerConfig()
    assert (optimizer.name, optimizer.peak_lr, optimizer.weight_decay) == (run.optimizer, run.lr, run.weight_decay)
    assert (optimizer.total_steps, optimizer.warmup_steps, optimizer.final_lr_fraction) == (
        run.steps,
        run.warmup,
        run.final_lr_fraction,
    )
