"""``afmkit eval ifeval | perplexity | sxs | sxs-ui | safety``: argument parsing and handlers.

``afmkit.cli`` only registers this group; everything heavy is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from afmkit.cli_args import dtype_argument, load_model, model_argument, recovery_argument
from afmkit.errors import UserError
from afmkit.eval.graders import API_KEY_ENV, JudgeSettings
from afmkit.eval.ifeval import IFEvalSettings
from afmkit.eval.perplexity import PerplexitySettings
from afmkit.eval.safety import SafetySettings
from afmkit.eval.sxs import SxsSettings
from afmkit.eval.sxs_ui import SxsUiSettings

# Each task's defaults live in its module's settings dataclass (read below, and by the task's
# Python functions); tests/test_cli_defaults.py checks every flag against it.


def _judge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge-url", help="base URL of an OpenAI-compatible server (POST {url}/v1/chat/completions)")
    d = JudgeSettings()
    parser.add_argument(
        "--judge-model", default=d.model, help=f"model name sent to the judge server (default {d.model!r})"
    )
    parser.add_argument(
        "--judge-timeout", type=float, default=d.timeout, help=f"seconds per judge request (default {d.timeout:g})"
    )
    parser.add_argument(
        "--judge-api-key", help=f"API key sent to the judge as a Bearer token (default: ${API_KEY_ENV} if set)"
    )


def _generation_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """``--max-new-tokens`` and ``--batch-size`` with a task's defaults (``IFEvalSettings``...)."""
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help=f"most tokens per response (default {defaults.max_new_tokens})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"prompts generated together (default {defaults.batch_size})",
    )


def register(commands: Any) -> None:
    """Add the ``eval`` command group to the top-level sub-command parsers."""
    evaluation = commands.add_parser("eval", help="evaluate models: ifeval, perplexity, sxs, sxs-ui, safety")
    tasks = evaluation.add_subparsers(required=True, metavar="TASK")

    ifeval = tasks.add_parser("ifeval", help="IFEval instruction following (prompt/instruction, strict/loose)")
    ifeval.set_defaults(run=cmd_ifeval)
    model_argument(ifeval, recovery=True)
    _adapter_argument(ifeval)
    ifeval.add_argument("--input", help="IFEval prompts JSONL (default: the 541 IFEval prompts shipped with afmkit)")
    ifeval.add_argument("--responses", help="score ready-made responses (JSONL with 'prompt' and 'response')")
    ifeval.add_argument("--limit", type=int, help="only the first N prompts")
    _generation_arguments(ifeval, IFEvalSettings())
    ifeval.add_argument("--out", help="results folder (responses.jsonl, results.json, report.md, a chart)")
    ifeval.add_argument("--json", action="store_true", help="last line: one JSON object with the four accuracies")

    perplexity = tasks.add_parser("perplexity", help="sliding-window token perplexity of a text file")
    perplexity.set_defaults(run=cmd_perplexity)
    model_argument(perplexity, recovery=True)
    _adapter_argument(perplexity)
    perplexity.add_argument("--text", required=True, help="a UTF-8 text file")
    perplexity.add_argument("--max-chars", type=int, help="only the first N characters of the file")
    ppl = PerplexitySettings()
    perplexity.add_argument(
        "--seq-len", type=int, default=ppl.seq_len, help=f"window length in tokens (default {ppl.seq_len})"
    )
    perplexity.add_argument(
        "--stride", type=int, default=ppl.stride, help=f"tokens between window starts (default {ppl.stride})"
    )
    perplexity.add_argument(
        "--batch-size", type=int, default=ppl.batch_size, help=f"windows per forward pass (default {ppl.batch_size})"
    )
    perplexity.add_argument("--json", action="store_true", help='last line: {"perplexity": ..., "tokens": ...}')

    sxs = tasks.add_parser("sxs", help="side-by-side: generate from two models, grade both orders, win/tie/lose")
    sxs.set_defaults(run=cmd_sxs)
    sxs.add_argument("--a", required=True, help="model A: name or path")
    sxs.add_argument("--b", required=True, help="model B: name or path")
    dtype_argument(sxs)
    recovery_argument(sxs)
    sxs.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line")
    sxs.add_argument("--grader", required=True, choices=["judge", "reward"], help="LLM judge or reward model")
    _judge_arguments(sxs)
    sxs.add_argument(
        "--reward",
        help="for --grader reward: a reward-model directory ('afmkit posttrain reward --out'), "
        "or module:callable scoring (prompt, response)",
    )
    sxs.add_argument(
        "--reward-base", help="model the reward-model directory runs on (default: the base it was trained on)"
    )
    sxs.add_argument("--limit", type=int, help="only the first N prompts")
    _generation_arguments(sxs, SxsSettings())
    sxs.add_argument("--out", required=True, help="results folder (responses, pairs.jsonl, grades, report)")
    sxs.add_argument("--json", action="store_true", help="last line: the report as one JSON object")

    ui = tasks.add_parser("sxs-ui", help="grade pairs by hand in a local web page; or print the report")
    ui.set_defaults(run=cmd_sxs_ui)
    ui.add_argument("--pairs", help="pairs.jsonl written by 'afmkit eval sxs' (key, prompt, a, b)")
    ui.add_argument("--db", required=True, help="SQLite file for the grades (created if missing)")
    ui_defaults = SxsUiSettings()
    ui.add_argument("--host", default=ui_defaults.host, help=f"address to listen on (default {ui_defaults.host})")
    ui.add_argument("--port", type=int, default=ui_defaults.port, help=f"port (default {ui_defaults.port})")
    ui.add_argument("--report", action="store_true", help="print the report from the grades in --db and exit")
    ui.add_argument("--out", help="with --report: also write sxs.json, sxs.md and sxs.png here")
    ui.add_argument("--json", action="store_true", help="with --report: last line is one JSON object")

    safety = tasks.add_parser("safety", help="violation rate on adversarial prompts")
    safety.set_defaults(run=cmd_safety)
    model_argument(safety, recovery=True)
    safety.add_argument(
        "--prompts",
        help="JSONL with 'prompt' (or hh-rlhf 'chosen' transcripts); default: the 2,178 hh-rlhf harmless-base "
        "test prompts shipped with afmkit",
    )
    safety.add_argument(
        "--grader",
        required=True,
        choices=["judge", "classifier", "refusal"],
        help="LLM judge, your classifier, or a refusal heuristic",
    )
    _judge_arguments(safety)
    safety.add_argument("--classifier", help="for --grader classifier: module:callable(prompt, response) -> bool")
    safety.add_argument("--limit", type=int, help="only the first N prompts")
    _generation_arguments(safety, SafetySettings())
    safety.add_argument("--out", required=True, help="results folder (responses, grades, report)")
    safety.add_argument("--json", action="store_true", help="last line: the report as one JSON object")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")


def _adapter_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="a LoRA adapter directory (PEFT layout) applied to every prompt")


def _check_adapter_dir(adapter: str | None) -> None:
    """Before the slow load: ``--adapter`` must be an adapter directory."""
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: not an adapter directory (no adapter_config.json)")


def apply_adapter(model: Any, adapter: str) -> Any:
    """The model with the PEFT-format LoRA adapter in directory ``adapter`` (checked against the
    base's fingerprint and shapes) applied to every request, unmerged: it works on packed and
    palettized weights alike."""
    from afmkit.adapters.peft_io import load_adapter

    lora = load_adapter(adapter, config=model.config, params=model.params)
    return model.with_adapter(lora, name=f"{model.name}:{lora.name or adapter}")


def _print(text: str, *, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr)


# -- ifeval --------------------------------------------------------------------------------------
def cmd_ifeval(args: argparse.Namespace) -> int:
    from afmkit.eval import ifeval

    _positive("--limit", args.limit)
    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--batch-size", args.batch_size)
    all_prompts = ifeval.load_prompts(args.input)
    prompts = all_prompts[: args.limit] if args.limit else all_prompts
    settings: dict[str, Any]
    if args.responses:
        if args.adapter:
            raise UserError("--adapter applies to generation; it does nothing with --responses")
        responses = ifeval.read_responses(args.responses, all_prompts)
        settings = {"responses": str(args.responses)}
    else:
        if not args.out:
            raise UserError("give --out DIR for the generated responses and the report (or --responses FILE)")
        _check_adapter_dir(args.adapter)
        start = time.perf_counter()
        model = load_model(
            args.model, args.dtype, quiet=args.json, recovery=not args.no_recovery, activations=args.activations
        )
        if args.adapter:
            model = apply_adapter(model, args.adapter)
        results, stats = ifeval.generate(
            model,
            prompts,
            args.out,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            quiet=args.json,
            # recovery recorded only when off, so runs from before the flag still resume
            run_settings={
                "model": args.model,
                "adapter": args.adapter,
                "dtype": args.dtype,
                **({"recovery": False} if args.no_recovery else {}),
                **({"activations": args.activations} if args.activations else {}),
            },
        )
        responses = {row["key"]: row["response"] for row in results}
        settings = {
            "model": args.model,
            "adapter": args.adapter,
            "dtype": args.dtype or "default",
            "recovery": not args.no_recovery,
            "activations": args.activations or "float32",
            "decoding": "greedy",
            "chat_template": True,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            **stats,
            "run_s": round(time.perf_counter() - start, 1),
        }
    if args.limit:
        settings["limit"] = args.limit
    scores = ifeval.score(prompts, responses)
    summary = ifeval.summarize(scores)
    if len(scores) < len(prompts):
        _print(f"note: {len(prompts) - len(scores)} of {len(prompts)} prompts have no response", quiet=False)
    if args.out:
        from afmkit.eval.jsonl import write_text_atomic

        paths = ifeval.write_report(args.out, summary, settings=settings)
        rows = ifeval.per_prompt_rows(scores)
        write_text_atomic(Path(args.out) / "per_prompt.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        _print(f"wrote {paths['json']}, {paths['markdown']}, {paths['chart']}", quiet=args.json)
    headline = {k: summary[k] for k in ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")}
    if args.json:
        print(json.dumps({**headline, "strict_average": summary["strict_average"], "prompts": summary["prompts"]}))
    else:
        for name, value in headline.items():
            print(f"{name:14s} {value:6.2f}")
        print(f"{'strict_average':14s} {summary['strict_average']:6.2f}   ({summary['prompts']} prompts)")
    return 0


# -- perplexity ----------------------------------------------------------------------------------
def cmd_perplexity(args: argparse.Namespace) -> int:
    from afmkit.eval.perplexity import perplexity_of_text, read_text, sliding_windows

    text = read_text(args.text, max_chars=args.max_chars)
    sliding_windows(2, seq_len=args.seq_len, stride=args.stride)  # validate before the slow load
    _positive("--batch-size", args.batch_size)
    _check_adapter_dir(args.adapter)
    model = load_model(
        args.model, args.dtype, quiet=args.json, recovery=not args.no_recovery, activations=args.activations
    )
    if args.adapter:
        model = apply_adapter(model, args.adapter)
    # Progress goes to stderr, so it shows with --json too (stdout's last line stays the JSON).
    result = perplexity_of_text(
        model, text, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size, quiet=False
    )
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "tokens": result.tokens, **result.to_dict()}))
    else:
        print(
            f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
            f"({result.windows} windows of {result.seq_len}, stride {result.stride})"
        )
    return 0


# -- side by side --------------------------------------------------------------------------------
def _judge(args: argparse.Namespace) -> Any:
    from afmkit.eval.graders import JudgeClient

    if not args.judge_url:
        raise UserError("--grader judge needs --judge-url (an OpenAI-compatible server, e.g. http://localhost:8000)")
    return JudgeClient(args.judge_url, model=args.judge_model, timeout=args.judge_timeout, api_key=args.judge_api_key)


def cmd_sxs(args: argparse.Namespace) -> int:
    from afmkit.eval import sxs
    from afmkit.eval.generation import check_run_settings
    from afmkit.eval.graders import (
        JudgeGrader,
        RewardModelGrader,
        is_reward_model_dir,
        load_callable,
        reward_model_grader,
    )

    for name in ("--limit", "--max-new-tokens", "--batch-size"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    prompts = sxs.load_prompts(args.prompts, limit=args.limit)
    if args.grader == "judge":
        client = _judge(args)
        client.check()  # one tiny request: fail before generating anything
        grader = JudgeGrader(client)
    else:
        if not args.reward:
            raise UserError(
                "--grader reward needs --reward: a reward-model directory or module:callable scoring (prompt, response)"
            )
        if is_reward_model_dir(args.reward):
            grader = reward_model_grader(args.reward, args.reward_base, dtype=args.dtype)
        else:
            grader = RewardModelGrader(load_callable(args.reward, flag="--reward"))
    out = Path(args.out)
    for side, name in (("a", args.a), ("b", args.b)):
        settings = {"model": name, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens}
        if args.no_recovery:  # recorded only when off, so runs from before the flag still resume
            settings["recovery"] = False
        if args.activations:
            settings["activations"] = args.activations
        check_run_settings(out / f"responses_{side}.jsonl", settings)
        if sxs.responses_complete(out, side, prompts):
            continue
        model = load_model(
            name, args.dtype, quiet=args.json, recovery=not args.no_recovery, activations=args.activations
        )
        sxs.generate_side(
            model,
            prompts,
            out,
            side=side,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            quiet=args.json,
        )
        del model
    pairs = sxs.write_pairs(out, prompts, model_a=args.a, model_b=args.b)
    grades = sxs.grade_pairs(pairs, grader, out, quiet=args.json)
    report = sxs.report_from_grades(grades, model_a=args.a, model_b=args.b, grader=grader.name, pairs=pairs)
    sxs.write_report(out, report)
    _print_sxs(report, as_json=args.json)
    return 0


def _print_sxs(report: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    from afmkit.eval.sxs import format_report

    print(format_report(report))


def cmd_sxs_ui(args: argparse.Namespace) -> int:
    from afmkit.eval import sxs, sxs_ui

    store = sxs_ui.GradeStore(args.db)
    if args.pairs:
        store.add_pairs(sxs.read_pairs(args.pairs))
    if args.report:
        report = store.report()
        if args.out:
            sxs.write_report(Path(args.out), report)
        _print_sxs(report, as_json=args.json)
        return 0
    if store.count_pairs() == 0:
        raise UserError(f"{args.db} has no pairs to grade; pass --pairs DIR/pairs.jsonl from 'afmkit eval sxs'")
    sxs_ui.serve(store, host=args.host, port=args.port)
    return 0


# -- safety --------------------------------------------------------------------------------------
def cmd_safety(args: argparse.Namespace) -> int:
    from afmkit.eval import safety
    from afmkit.eval.graders import load_callable

    for name in ("--limit", "--max-new-tokens", "--batch-size"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    prompts = safety.load_prompts(args.prompts, limit=args.limit)
    if args.grader == "judge":
        client = _judge(args)
        client.check()  # one tiny request: fail before generating anything
        grader = safety.JudgeSafetyGrader(client)
    elif args.grader == "classifier":
        if not args.classifier:
            raise UserError("--grader classifier needs --classifier module:callable(prompt, response) -> bool")
        grader = safety.ClassifierSafetyGrader(load_callable(args.classifier, flag="--classifier"))
    else:
        grader = safety.RefusalHeuristicGrader()
    model = load_model(
        args.model, args.dtype, quiet=args.json, recovery=not args.no_recovery, activations=args.activations
    )
    report = safety.run(
        model,
        prompts,
        grader,
        args.out,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        model_name=args.model,
        quiet=args.json,
        run_settings={"model": args.model, "dtype": args.dtype},
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(safety.format_report(report))
    return 0
