"""The ``afmkit`` command: one console script with sub-commands.

User errors (bad names, paths, parameters) print one line and exit with status 2; they never
show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from afmkit.errors import UserError

EXIT_USER_ERROR = 2


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _model_argument(parser: argparse.ArgumentParser) -> None:
    from afmkit.lm import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model name or path (.gguf, afmkit or Hugging Face directory); default {DEFAULT_MODEL}",
    )
    dtype_argument(parser)


def dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "int4", "int8"],
        help="weight precision (default: float32 on CPUs, bfloat16 on accelerators); int4/int8 pack the "
        "matrices to 4/8 bits (fastest decoding on CPUs; lossless for SmolLM2's 4-bit GGUF)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afmkit", description="Apple's foundation-model recipe, in JAX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="complete one prompt, streamed")
    _model_argument(generate)
    generate.add_argument("--prompt", required=True, help="the prompt text ('-' reads standard input)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--system", help="system message (with --chat)")
    _sampling_arguments(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    chat = commands.add_parser("chat", help="interactive chat, streamed")
    _model_argument(chat)
    chat.add_argument("--system", help="system message")
    _sampling_arguments(chat)

    info = commands.add_parser("info", help="parameter counts and memory of a model size or model")
    info.add_argument("name", help="a model size (e.g. afm-on-device), model name or path")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    from afmkit.data.curation.command import add_curate_parser
    from afmkit.data.tokenizer_training import add_tokenizer_parser

    add_tokenizer_parser(commands)
    add_curate_parser(commands)

    from afmkit.train import cli as train_cli

    train_cli.add_parsers(commands)

    from afmkit.adapters.train import add_train_arguments
    from afmkit.infer.server import add_serve_arguments

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with LoRA adapters")
    _model_argument(serve)
    add_serve_arguments(serve)

    adapter = commands.add_parser("adapter", help="LoRA adapters: train")
    adapter_commands = adapter.add_subparsers(dest="adapter_command", required=True, metavar="ACTION")
    adapter_train = adapter_commands.add_parser("train", help="fine-tune a LoRA adapter on chat data (JSONL)")
    _model_argument(adapter_train)
    add_train_arguments(adapter_train)

    from afmkit.eval.cli import register as register_eval

    register_eval(commands)
    return parser


def _sampling(args: argparse.Namespace):
    from afmkit.infer.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _load(name: str, dtype: str | None, *, quiet: bool):
    from rich.console import Console

    import afmkit

    if quiet:
        return afmkit.load(name, dtype=dtype)
    with Console(stderr=True).status(f"loading {name}"):
        return afmkit.load(name, dtype=dtype)


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)  # validate before the slow load
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.system and not args.chat:
        raise UserError("--system needs --chat")
    start = time.perf_counter()
    model = _load(args.model, args.dtype, quiet=args.json)
    load_s = time.perf_counter() - start
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = model.tokenizer.apply_chat_template(messages)
    ids = model.tokenizer.encode(prompt)
    if args.json:
        completion = model.engine.generate([ids], sampling)[0]
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
    for event in model.engine.stream([ids], sampling):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    sampling = _sampling(args)
    console = Console(stderr=True)
    model = _load(args.model, args.dtype, quiet=False)
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
        ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(history))
        if interactive:
            sys.stdout.write("assistant> ")
        reply = []
        for event in model.engine.stream([ids], sampling):
            reply.append(event.text)
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _format_count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


MEMORY_FORMATS = {"fp32": 32, "bf16": 16, "4-bit": 4, "3.5-bit": 3.5}


def cmd_info(args: argparse.Namespace) -> int:
    from afmkit.lm import load_config

    config = load_config(args.name)
    counts = {
        "embedding_params": config.embedding_params,
        "non_embedding_params": config.non_embedding_params,
        "total_params": config.total_params,
    }
    memory = {fmt: config.total_params * bits / 8 for fmt, bits in MEMORY_FORMATS.items()}
    if args.json:
        print(json.dumps({"name": args.name, "config": config.to_dict(), **counts, "weight_bytes": memory}))
        return 0
    from rich.console import Console
    from rich.table import Table

    shape = Table(title=f"{args.name}", show_header=False)
    for key in (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "d_ff",
        "rope_base",
        "qk_norm",
        "tie_embeddings",
        "max_seq_len",
    ):
        shape.add_row(key, str(getattr(config, key)))
    params = Table(title="parameters")
    params.add_column("part")
    params.add_column("count", justify="right")
    params.add_row("embedding", _format_count(counts["embedding_params"]))
    params.add_row("non-embedding", _format_count(counts["non_embedding_params"]))
    params.add_row("total", _format_count(counts["total_params"]))
    mem = Table(title="weight memory")
    mem.add_column("format")
    mem.add_column("bytes", justify="right")
    for fmt, size in memory.items():
        mem.add_row(fmt, _format_bytes(size))
    console = Console()
    console.print(shape, params, mem)
    if config.note:
        console.print(f"note: {config.note}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from afmkit.data.tokenizer_training import cmd_tokenizer_train

    return {"train": cmd_tokenizer_train}[args.tokenizer_command](args)


def cmd_curate(args: argparse.Namespace) -> int:
    from afmkit.data.curation.command import cmd_curate as run

    return run(args)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from afmkit.train.cli import cmd_pretrain as run

    return run(args)


def cmd_shard_plan(args: argparse.Namespace) -> int:
    from afmkit.train.cli import cmd_shard_plan as run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from afmkit.infer.server import cmd_serve as serve

    return serve(args)


def cmd_adapter(args: argparse.Namespace) -> int:
    from afmkit.adapters.train import cmd_adapter_train

    return {"train": cmd_adapter_train}[args.adapter_command](args)


def cmd_eval(args: argparse.Namespace) -> int:
    from afmkit.eval.cli import cmd_eval as run_eval

    return run_eval(args)


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "info": cmd_info,
    "tokenizer": cmd_tokenizer,
    "curate": cmd_curate,
    "pretrain": cmd_pretrain,
    "shard-plan": cmd_shard_plan,
    "serve": cmd_serve,
    "adapter": cmd_adapter,
    "eval": cmd_eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"afmkit: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
