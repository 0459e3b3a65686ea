"""Every command's defaults live in one settings dataclass, which its flags and its Python
functions both read. This walks every registered command: a flag's default must be the
dataclass field's, its help must quote that value, and no flag may carry a default that is in no
dataclass. A new command must join ``SOURCES`` (the test fails until it does)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import NamedTuple

import pytest

from afmkit.adapters.train import TrainSettings, settings_from_args
from afmkit.cli import build_parser
from afmkit.compress.settings import CompressSettings, RecoverSettings
from afmkit.data.curation.settings import CurationSettings
from afmkit.data.tokenizer_training import TokenizerTrainSettings
from afmkit.eval.graders import JudgeSettings
from afmkit.eval.ifeval import IFEvalSettings
from afmkit.eval.perplexity import PerplexitySettings
from afmkit.eval.safety import SafetySettings
from afmkit.eval.sxs import SxsSettings
from afmkit.eval.sxs_ui import SxsUiSettings
from afmkit.infer.api.state import ServerLimits
from afmkit.infer.sampling import SamplingParams
from afmkit.infer.serve_settings import ServeSettings
from afmkit.interop.export import ExportSettings
from afmkit.posttrain.dpo import DPOSettings
from afmkit.posttrain.edit_data import EditDataSettings
from afmkit.posttrain.itec import ItecSettings
from afmkit.posttrain.loop_cut import LoopCutSettings
from afmkit.posttrain.reward import RewardSettings
from afmkit.posttrain.rl import RLSettings
from afmkit.posttrain.sft import SFTSettings
from afmkit.posttrain.synth_if import SynthIFSettings
from afmkit.talaria.settings import TalariaSettings
from afmkit.train.settings import PretrainConfig


class Source(NamedTuple):
    settings: type
    prefix: str = ""  # flag dest = prefix + field name (--judge-model -> JudgeSettings.model)
    every_field: bool = True  # every field is a flag of the command


# Flags every model-loading command shares; their defaults live in afmkit.cli_args.
SHARED = {"model", "help"}
# Commands whose flags default to None and are filled from the dataclass after parsing
# (tests/train/test_pretrain_defaults.py checks that resolution and the help texts).
RESOLVED_AFTER_PARSING = {("pretrain",), ("shard-plan",)}
# Commands whose defaults have not moved into a dataclass yet: ``serve`` (its owner is moving them).
NOT_YET: set[tuple[str, ...]] = set()

SOURCES: dict[tuple[str, ...], tuple[Source, ...]] = {
    ("generate",): (Source(SamplingParams),),
    ("chat",): (Source(SamplingParams),),
    ("info",): (),
    ("export",): (Source(ExportSettings),),
    ("compress", "palettize"): (Source(CompressSettings),),
    ("compress", "recover"): (Source(RecoverSettings),),
    ("serve",): (Source(ServeSettings), Source(ServerLimits, every_field=False)),
    ("tokenizer", "train"): (Source(TokenizerTrainSettings),),
    ("curate",): (Source(CurationSettings),),
    ("pretrain",): (Source(PretrainConfig, every_field=False),),
    ("shard-plan",): (Source(PretrainConfig, every_field=False),),
    ("adapter", "train"): (Source(TrainSettings),),
    ("adapter", "mix"): (),
    ("eval", "ifeval"): (Source(IFEvalSettings),),
    ("eval", "perplexity"): (Source(PerplexitySettings),),
    ("eval", "sxs"): (Source(SxsSettings), Source(JudgeSettings, prefix="judge_")),
    ("eval", "sxs-ui"): (Source(SxsUiSettings),),
    ("eval", "safety"): (Source(SafetySettings), Source(JudgeSettings, prefix="judge_")),
    ("posttrain", "itec"): (Source(ItecSettings),),
    ("posttrain", "dpo"): (Source(DPOSettings),),
    ("posttrain", "edit-data"): (Source(EditDataSettings),),
    ("posttrain", "loop-cut"): (Source(LoopCutSettings),),
    ("posttrain", "reward"): (Source(RewardSettings),),
    ("posttrain", "rl"): (Source(RLSettings),),
    ("posttrain", "sft"): (Source(SFTSettings),),
    ("posttrain", "synth-if"): (Source(SynthIFSettings),),
    ("talaria",): (Source(TalariaSettings),),
}


def leaf_parsers(parser=None, path=()):
    parser = parser or build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
        return
    for name, child in subparsers[0].choices.items():
        yield from leaf_parsers(child, (*path, name))


COMMANDS = dict(leaf_parsers())


def field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def as_flag_value(value, action: argparse.Action):
    """The field's default as the flag holds it: tuples are comma-joined strings or append lists."""
    if isinstance(value, tuple):
        return list(value) if isinstance(action, argparse._AppendAction) else ",".join(map(str, value))
    return value


def quoted(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_every_registered_command_is_in_the_table():
    missing = set(COMMANDS) - set(SOURCES) - NOT_YET
    assert not missing, f"add {sorted(missing)} to SOURCES (its settings dataclass, or () if it has no defaults)"
    assert not (set(SOURCES) | NOT_YET) - set(COMMANDS), "the table names a command that is not registered"


@pytest.mark.parametrize("path", sorted(SOURCES), ids=" ".join)
def test_flag_defaults_are_the_settings_dataclass_defaults(path):
    actions = {a.dest: a for a in COMMANDS[path]._actions if a.option_strings}
    covered = set()
    for source in SOURCES[path]:
        for field in dataclasses.fields(source.settings):
            dest = source.prefix + field.name
            if dest not in actions:
                assert not source.every_field, f"{' '.join(path)}: {source.settings.__name__}.{field.name} has no flag"
                continue
            covered.add(dest)
            action, value = actions[dest], field_default(field)
            if path in RESOLVED_AFTER_PARSING and action.default is None:
                continue
            assert action.default == as_flag_value(value, action), (path, dest, action.default, value)
            if value is not None and not isinstance(value, (bool, tuple)) and value != "":
                assert f"default {quoted(value)}" in action.help or f"default {value!r}" in action.help, (
                    path,
                    dest,
                    action.help,
                )
    # A default that is in no dataclass is a second source: the thing this test exists to stop.
    stray = {
        dest: a.default
        for dest, a in actions.items()
        if dest not in covered | SHARED and a.default not in (None, False, [], argparse.SUPPRESS)
    }
    assert not stray, f"{' '.join(path)}: flags with defaults of their own: {stray}"


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_adapter_train_without_flags_is_exactly_train_settings():
    args = parse("adapter", "train", "--data", "d.jsonl", "--out", "o")
    assert settings_from_args(args) == TrainSettings()
    # alpha follows the rank in both: 2 x rank, the same from Python and from the command line.
    args = parse("adapter", "train", "--data", "d.jsonl", "--out", "o", "--rank", "4", "--targets", "q, v")
    assert settings_from_args(args) == TrainSettings(rank=4, targets=("q", "v")) and TrainSettings(rank=4).alpha == 8
    assert TrainSettings(rank=4, alpha=1.0).alpha == 1.0


def python_defaults():
    """(function, parameter, the settings field it must read)."""
    from afmkit.data import tokenizer_training
    from afmkit.data.curation import default_steps
    from afmkit.eval import ifeval, perplexity, safety, sxs, sxs_ui
    from afmkit.eval.graders import JudgeClient

    rows = []
    for fn in (perplexity.perplexity_of_tokens, perplexity.perplexity_of_text):
        rows += [(fn, name, PerplexitySettings) for name in ("seq_len", "stride", "batch_size")]
    rows += [(ifeval.generate, name, IFEvalSettings) for name in ("max_new_tokens", "batch_size")]
    rows += [(sxs.generate_side, name, SxsSettings) for name in ("max_new_tokens", "batch_size")]
    rows += [(safety.run, name, SafetySettings) for name in ("max_new_tokens", "batch_size")]
    rows += [(sxs_ui.serve, name, SxsUiSettings) for name in ("host", "port")]
    rows += [(JudgeClient.__init__, name, JudgeSettings) for name in ("model", "timeout")]
    rows += [(tokenizer_training.train_tokenizer, "min_frequency", TokenizerTrainSettings)]
    rows += [
        (tokenizer_training.train_tokenizer_on_sources, n, TokenizerTrainSettings)
        for n in ("min_frequency", "text_key")
    ]
    names = ("profile", "near_threshold", "shingle", "shingle_size", "ngram", "min_ngram", "common_count")
    rows += [(default_steps, name, CurationSettings) for name in names]
    return rows


@pytest.mark.parametrize(("fn", "name", "settings"), python_defaults(), ids=lambda x: getattr(x, "__qualname__", x))
def test_python_function_defaults_are_the_settings_dataclass_defaults(fn, name, settings):
    expected = {f.name: f.default for f in dataclasses.fields(settings)}[name]
    assert inspect.signature(fn).parameters[name].default == expected
