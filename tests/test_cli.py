"""The ``afmkit`` command as a user runs it, in a subprocess."""

import json
import subprocess
import sys

import pytest


def afmkit(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "afmkit.cli", *args], capture_output=True, text=True, input=stdin, timeout=600
    )


def _assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("afmkit: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_generate_json_has_text_tokens_prompt_tokens_and_timings():
    result = afmkit(
        "generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "12", "--json"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"text", "tokens", "prompt_tokens", "timings"} <= set(record)
    assert "Paris" in record["text"]
    assert 0 < len(record["tokens"]) <= 12 and record["prompt_tokens"] > 10
    assert record["timings"]["ttft_s"] > 0


def test_streamed_output_equals_the_json_text():
    args = ("generate", "--prompt", "The three primary colors are", "--max-new-tokens", "16")
    streamed = afmkit(*args)
    as_json = json.loads(afmkit(*args, "--json").stdout)
    assert streamed.returncode == 0
    assert streamed.stdout == as_json["text"] + "\n"


def test_chat_reads_turns_from_standard_input():
    result = afmkit("chat", "--max-new-tokens", "20", stdin="What is the capital of France?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_info_prints_published_afm_counts_without_weights():
    result = afmkit("info", "afm-on-device")
    assert result.returncode == 0
    assert "2.587B" in result.stdout and "151.0M" in result.stdout and "3.5-bit" in result.stdout
    record = json.loads(afmkit("info", "afm-on-device", "--json").stdout)
    assert record["non_embedding_params"] == pytest.approx(2.58e9, rel=0.01)
    assert record["weight_bytes"]["4-bit"] == record["total_params"] / 2


def test_unknown_model_lists_the_known_ones():
    _assert_user_error(afmkit("generate", "--model", "gpt-17", "--prompt", "hi"), "smollm2-135m-instruct")


def test_missing_weight_file():
    _assert_user_error(afmkit("generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"), "does not exist")


def test_corrupt_weight_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    _assert_user_error(afmkit("generate", "--model", str(bad), "--prompt", "hi"), "broken.gguf")


def test_prompt_longer_than_the_context():
    _assert_user_error(afmkit("generate", "--prompt", "hello " * 9000), "context")


@pytest.mark.parametrize(
    ("flag", "value"), [("--temperature", "-0.5"), ("--top-p", "0"), ("--top-k", "-1"), ("--max-new-tokens", "0")]
)
def test_invalid_sampling_parameters(flag, value):
    _assert_user_error(afmkit("generate", "--prompt", "hi", flag, value), flag.lstrip("-").replace("-", "_"))


def test_generate_with_bf16_weights():
    result = afmkit("generate", "--chat", "--prompt", "What is the capital of France?", "--dtype", "bfloat16", "--json")
    assert result.returncode == 0, result.stderr
    assert "Paris" in json.loads(result.stdout)["text"]


def test_generate_with_int4_packed_weights():
    result = afmkit("generate", "--chat", "--prompt", "What is the capital of France?", "--dtype", "int4", "--json")
    assert result.returncode == 0, result.stderr
    assert "Paris" in json.loads(result.stdout)["text"]


def test_version():
    from afmkit import __version__

    result = afmkit("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"afmkit {__version__}"


def test_prompt_file_gives_the_same_text_as_prompt(tmp_path):
    prompt = "The three primary colors are"
    (tmp_path / "p.txt").write_text(prompt, encoding="utf-8")
    from_file = afmkit("generate", "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens", "8", "--json")
    inline = afmkit("generate", "--prompt", prompt, "--max-new-tokens", "8", "--json")
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["tokens"] == json.loads(inline.stdout)["tokens"]
    _assert_user_error(afmkit("generate", "--prompt-file", str(tmp_path / "none.txt")), "--prompt-file", "no such file")


def _parser_for(*command):
    """The argparse parser of one (sub-)command, found by walking the registered sub-parsers."""
    import argparse

    from afmkit.cli import build_parser

    parser = build_parser()
    for name in command:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", [("generate",), ("chat",)])
def test_sampling_flag_defaults_are_sampling_params_defaults(command):
    """The CLI has no defaults of its own for sampling: they are ``SamplingParams()``'s."""
    import dataclasses

    from afmkit.infer.sampling import SamplingParams

    defaults = _parser_for(*command).parse_args(["--prompt", "x"] if command == ("generate",) else [])
    for field in dataclasses.fields(SamplingParams):
        cli_value = getattr(defaults, field.name)
        expected = getattr(SamplingParams(), field.name)
        assert (tuple(cli_value) if field.name == "stop" else cli_value) == expected, field.name


def test_every_command_registers_a_run_function():
    import argparse

    from afmkit.cli import build_parser

    def leaves(parser, path=()):
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            yield path, parser
            return
        for name, child in subparsers[0].choices.items():
            yield from leaves(child, (*path, name))

    found = dict(leaves(build_parser()))
    assert {("generate",), ("eval", "ifeval"), ("pretrain",), ("adapter", "train"), ("curate",)} <= set(found)
    for path, parser in found.items():
        assert callable(parser.get_default("run")), path


def test_commands_other_than_serve_run_without_the_web_framework():
    """Building the command line must not import the server's fastapi/uvicorn: every command
    would pay for them, and a machine without them (a GPU image, say) could run none."""
    code = (
        "import sys; from afmkit.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
