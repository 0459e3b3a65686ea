"""The ``afmkit`` command: one console script with sub-commands.

Every command group lives beside the code it drives and registers itself the same way: a
``register(commands)`` function adds its parser(s) and sets ``run`` (a function of the parsed
arguments returning the exit status) with ``set_defaults``. To add a command, write such a
function and list it in ``COMMAND_GROUPS``. A command that trains also sets ``trains=True``: the
process then restarts once with glibc settings that keep freed memory (``runtime.restart_keeping_freed_memory``);
any other command gives freed blocks of 1 MiB and more back to the OS (``runtime.return_freed_memory``).
``AFMKIT_MALLOC=default`` keeps glibc's defaults for both.

User errors (bad names, paths, parameters) print one line and exit with status 2; they never
show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from afmkit.errors import UserError

EXIT_USER_ERROR = 2

# Modules with a ``register(commands)`` function, in the order ``afmkit --help`` lists them.
COMMAND_GROUPS = (
    "afmkit.infer.cli",  # generate, chat, serve
    "afmkit.cli",  # info
    "afmkit.data.tokenizer_training",  # tokenizer train
    "afmkit.data.curation.command",  # curate
    "afmkit.train.cli",  # pretrain, shard-plan
    "afmkit.adapters.train",  # adapter train
    "afmkit.posttrain.cli",  # posttrain sft|synth-if|reward|itec|rl
    "afmkit.interop.export",  # export
    "afmkit.compress.cli",  # compress palettize
    "afmkit.eval.cli",  # eval ifeval|perplexity|sxs|sxs-ui|safety
    "afmkit.talaria.cli",  # talaria
)


def build_parser() -> argparse.ArgumentParser:
    from afmkit import __version__

    parser = argparse.ArgumentParser(prog="afmkit", description="Apple's foundation-model recipe, in JAX.")
    parser.add_argument("--version", action="version", version=f"afmkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_GROUPS:
        importlib.import_module(module).register(commands)
    return parser


def register(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="parameter counts and memory of a model size or model")
    info.add_argument("name", help="a model size (e.g. afm-on-device), model name or path")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=cmd_info)


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
    stored = stored_bits(args.name, config)
    adapter = packaged_adapter(args.name)
    if args.json:
        extra = {} if stored is None else {"bits_per_weight": stored}
        extra |= {} if adapter is None else {"adapter": adapter}
        print(json.dumps({"name": args.name, "config": config.to_dict(), **counts, "weight_bytes": memory, **extra}))
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
    if stored is not None:
        bits = Table(title="stored bits per weight")
        bits.add_column("weights")
        bits.add_column("bits", justify="right")
        for part in ("matrices", "embedding", "all_weights"):
            bits.add_row(part.replace("_", " "), f"{stored[part]:.4f}")
        console.print(bits)
    if adapter is not None:
        console.print(
            f"adapter: {adapter['run']} (rank {adapter['rank']}, alpha {adapter['alpha']:g}, "
            f"{_format_bytes(adapter['bytes'])}) on {adapter['base']}, shipped in afmkit/resources/{adapter['folder']}"
        )
    if config.note:
        console.print(f"note: {config.note}")
    return 0


def packaged_adapter(name: str) -> dict | None:
    """What a named adapted model (``smollm2-135m-afm``) adds to its base, read from the packaged
    files without loading anything: the run that made the adapter, its rank, alpha, targets and
    size. None for other models."""
    from afmkit.files import packaged_data
    from afmkit.weights import NAMED_ADAPTED

    if name not in NAMED_ADAPTED:
        return None
    base, folder = NAMED_ADAPTED[name]
    directory = packaged_data(f"{folder}/adapter_config.json").parent
    peft = json.loads((directory / "adapter_config.json").read_text())
    own = json.loads((directory / "afmkit_adapter.json").read_text())
    return {
        "base": base,
        "folder": folder,
        "run": own["name"],
        "rank": peft["r"],
        "alpha": peft["lora_alpha"],
        "targets": peft["target_modules"],
        "bytes": (directory / "adapter_model.safetensors").stat().st_size,
    }


def stored_bits(name: str, config: object) -> dict | None:
    """Bits per weight of a compressed model (a named one from its committed recipe, without
    building it; a compressed directory from its file headers): ``matrices`` (the layer matrices,
    tables and scales counted, as ``compress --bits-per-weight`` counts them), ``embedding`` and
    ``all_weights``. None for other models and model sizes."""
    from pathlib import Path

    from afmkit.weights import NAMED_ADAPTED, NAMED_COMPRESSED

    name = NAMED_ADAPTED[name][0] if name in NAMED_ADAPTED else name  # an adapter stores no weights of its own
    if name in NAMED_COMPRESSED:
        from afmkit.compress.named import bits_report

        return bits_report(NAMED_COMPRESSED[name], config)
    path = Path(name).expanduser()
    if (path / "afmkit.json").is_file():
        from afmkit.compress.palettize import checkpoint_bits

        return checkpoint_bits(path)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # only a real command line changes the process's malloc settings
        from afmkit import runtime

        if getattr(args, "trains", False):
            runtime.restart_keeping_freed_memory()
        else:
            runtime.return_freed_memory()
    try:
        return args.run(args)
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
