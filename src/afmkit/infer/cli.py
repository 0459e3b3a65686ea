"""``afmkit generate``, ``afmkit chat`` and ``afmkit serve``: the inference commands."""

from __future__ import annotations

import argparse
import json
import sys
import time

from afmkit.cli_args import load_model, model_argument, sampling_arguments, sampling_from_args
from afmkit.errors import UserError


def register(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="complete one prompt, streamed")
    model_argument(generate, recovery=True)
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text ('-' reads standard input)")
    prompt.add_argument("--prompt-file", help="read the prompt from this file (UTF-8)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--system", help="system message (with --chat)")
    sampling_arguments(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat, streamed")
    model_argument(chat, recovery=True)
    chat.add_argument("--system", help="system message")
    sampling_arguments(chat)
    chat.set_defaults(run=cmd_chat)

    from afmkit.infer.serve_settings import add_serve_arguments

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with LoRA adapters")
    model_argument(serve, recovery=True)
    add_serve_arguments(serve)
    serve.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from afmkit.infer.server import cmd_serve as serve

    return serve(args)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as file:
                return file.read()
        except FileNotFoundError:
            raise UserError(f"--prompt-file {args.prompt_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({exc})") from None
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)  # validate before the slow load
    prompt = _read_prompt(args)
    if args.system and not args.chat:
        raise UserError("--system needs --chat")
    start = time.perf_counter()
    model = load_model(
        args.model, args.dtype, quiet=args.json, recovery=not args.no_recovery, activations=args.activations
    )
    load_s = time.perf_counter() - start
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = model.tokenizer.apply_chat_template(messages)
    if args.json:
        completion = model.generate(prompt, sampling=sampling)
        timings = {"load_s": round(load_s, 4), **{k: round(v, 4) for k, v in completion.timings.items()}}
        record = {
            "model": model.name,
            "text": completion.text,
            "tokens": completion.tokens,
            "prompt_tokens": completion.prompt_tokens,
            "finish_reason": completion.finish_reason,
            "timings": timings,
        }
        print(json.dumps(record, ensure_ascii=False))
        return 0
    for event in model.generate(prompt, stream=True, sampling=sampling):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    sampling = sampling_from_args(args)
    console = Console(stderr=True)
    model = load_model(args.model, args.dtype, quiet=False, recovery=not args.no_recovery, activations=args.activations)
    interactive = sys.stdin.isatty()
    if interactive:
        console.print(f"[bold]{model.name}[/bold]: type a message; /reset clears the history, /exit or Ctrl-D quits.")
    history = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        if interactive:
            sys.stdout.write("assistant> ")
        reply = []
        for event in model.chat(history, stream=True, sampling=sampling):
            reply.append(event.text)
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0
