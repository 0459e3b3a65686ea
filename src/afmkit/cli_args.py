"""Arguments that several commands share (``--model``, ``--dtype``, sampling, the training-run
flags), each defined once.

Defaults come from the dataclasses that consume them (``SamplingParams``), never from literals
here, so the CLI, the Python API and the server cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from afmkit.errors import UserError
from afmkit.weights import DEFAULT_MODEL

WEIGHT_DTYPE_CHOICES = ("float32", "bfloat16", "int4", "int8")


def settings_from_args(settings_class: type, args: argparse.Namespace, **parsed: object):
    """A command's settings dataclass from its parsed flags, which share the fields' names;
    ``parsed``: fields whose flag text needs converting first (e.g. ``comma_list``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings_class) if hasattr(args, f.name)}
    return settings_class(**{**values, **parsed})


def comma_list(text: str) -> tuple[str, ...]:
    """``"q, v,"`` -> ``("q", "v")``: a comma-separated flag's items."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=WEIGHT_DTYPE_CHOICES,
        help="weight precision. Default on CPUs: a quantized GGUF at its own bits (int4 for SmolLM2's 4-bit "
        "file, lossless and ~3x faster decoding), other models float32 (exact; ask for it to compare); "
        "on accelerators bfloat16. int4/int8 pack the matrices to 4/8 bits",
    )


def recovery_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-recovery`` and ``--activations``: how a compressed model runs."""
    parser.add_argument(
        "--no-recovery",
        action="store_true",
        help="load a compressed model without its accuracy-recovery adapter (DIR/recovery), "
        "e.g. to measure what the adapter recovers",
    )
    parser.add_argument(
        "--activations",
        choices=("float32", "int8"),
        default=None,
        help="int8: quantize the input of every palettized matrix per token to 8-bit integers at run time "
        "(a compressed model only; VNNI dot products where the CPU has them). Default: float32",
    )


def model_argument(
    parser: argparse.ArgumentParser,
    flag: str = "--model",
    *,
    role: str = "model",
    dtype: bool = True,
    recovery: bool = False,
) -> None:
    """``--model`` (a name or a path), unless ``dtype=False`` ``--dtype``, and with ``recovery``
    ``--no-recovery`` (for commands that use the model as it loads: generate, serve, eval)."""
    parser.add_argument(
        flag,
        default=DEFAULT_MODEL,
        help=f"{role}: a model name, a .gguf file, an afmkit, Hugging Face or training-run directory "
        f"(default {DEFAULT_MODEL})",
    )
    if dtype:
        dtype_argument(parser)
    if recovery:
        recovery_argument(parser)


def setting_argument(parser: Any, defaults: Any, name: str, help: str, **kwargs: Any) -> None:
    """``--name`` (underscores as dashes) for the settings field ``name``, its type and default
    those of ``defaults`` (the command's settings dataclass as constructed with no arguments),
    the default quoted at the end of ``help``; a bool field is an on-switch."""
    flag = "--" + name.replace("_", "-")
    value = getattr(defaults, name)
    if isinstance(value, bool):
        parser.add_argument(flag, action="store_true", default=value, help=help, **kwargs)
        return
    shown = f"{value:g}" if isinstance(value, float) else value
    parser.add_argument(flag, type=type(value), default=value, help=f"{help} (default {shown})", **kwargs)


def lora_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """A LoRA-training command's adapter flags: the rank (``--rank`` or ``--lora-rank``, as its
    settings name the field; where they have ``full``, ``--full`` is the alternative: every
    weight), ``--alpha`` and ``--targets``."""
    rank = "rank" if hasattr(defaults, "rank") else "lora_rank"
    if hasattr(defaults, "full"):
        kind = parser.add_mutually_exclusive_group()
        setting_argument(kind, defaults, rank, "LoRA rank")
        setting_argument(kind, defaults, "full", "train every weight (fp32) instead of a LoRA adapter")
    else:
        setting_argument(parser, defaults, rank, "LoRA rank")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    targets = ",".join(defaults.targets)
    parser.add_argument("--targets", default=targets, help=f"comma-separated linears to adapt (default {targets})")


def run_arguments(
    parser: argparse.ArgumentParser,
    defaults: Any,
    *,
    seed: str,
    save_every: str = "checkpoint every N steps",
    resume: str = "continue the run in --out from its last checkpoint",
    quiet: str = "no progress bar",
) -> None:
    """A training command's run flags, each where its settings have the field: ``--save-every``,
    ``--keep``, ``--mesh``, ``--seed``, ``--resume``, ``--quiet``; the texts are what the
    command's seed seeds and what its saves, resume and quiet mean."""
    if hasattr(defaults, "save_every"):
        setting_argument(parser, defaults, "save_every", save_every)
    if hasattr(defaults, "keep"):
        setting_argument(parser, defaults, "keep", "checkpoints kept")
    if hasattr(defaults, "mesh"):  # None: one device
        parser.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,tensor=2 (default: one device)")
    setting_argument(parser, defaults, "seed", seed)
    if hasattr(defaults, "resume"):
        setting_argument(parser, defaults, "resume", resume)
        setting_argument(parser, defaults, "quiet", quiet)


def sampling_defaults():
    from afmkit.infer.sampling import SamplingParams

    return SamplingParams()


def sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling flags, defaulting to ``SamplingParams()``'s fields."""
    d = sampling_defaults()
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help=f"most tokens to generate (default {d.max_new_tokens})",
    )
    parser.add_argument(
        "--temperature", type=float, default=d.temperature, help=f"0 = greedy (default {d.temperature:g})"
    )
    parser.add_argument(
        "--top-k", type=int, default=d.top_k, help=f"sample from the k most likely tokens (0 = off; default {d.top_k})"
    )
    parser.add_argument(
        "--top-p", type=float, default=d.top_p, help=f"nucleus sampling mass (1 = off; default {d.top_p:g})"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed for sampling (default {d.seed})")
    parser.add_argument("--stop", action="append", default=list(d.stop), help="stop string (repeatable)")
    parser.add_argument(
        "--presence-penalty",
        type=float,
        default=d.presence_penalty,
        help=f"lower a generated token's logit once it appeared (-2..2; default {d.presence_penalty:g})",
    )
    parser.add_argument(
        "--frequency-penalty",
        type=float,
        default=d.frequency_penalty,
        help=f"lower a token's logit per time it was generated (-2..2; default {d.frequency_penalty:g})",
    )


def sampling_from_args(args: argparse.Namespace):
    """``SamplingParams`` from the flags ``sampling_arguments`` added (validated there)."""
    from afmkit.infer.sampling import SamplingParams

    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    values["stop"] = tuple(values.get("stop", ()))
    return SamplingParams(**values)


def load_model(name: str, dtype: str | None, *, quiet: bool, recovery: bool = True, activations: str | None = None):
    """``afmkit.load`` with a spinner on stderr (none when ``quiet``, e.g. for ``--json``)."""
    import afmkit

    if quiet:
        return afmkit.load(name, dtype=dtype, recovery=recovery, activations=activations)
    from rich.console import Console

    with Console(stderr=True).status(f"loading {name}"):
        return afmkit.load(name, dtype=dtype, recovery=recovery, activations=activations)


CONTINUE_WITH_INIT_ADAPTER = "give its base model as --model and start from the adapter with --init-adapter DIR"


def load_training_base(
    name: str, dtype: str | None, *, full: bool = False, fix: str = CONTINUE_WITH_INIT_ADAPTER
) -> Any:
    """The base model a command trains over: ``full`` trains fp32 master weights, so they load
    exactly; LoRA trains over the base as loaded (on CPUs SmolLM2's own int4 weights, QLoRA-style).
    A compressed model loads without its recovery adapter; a name that carries an adapter
    (``smollm2-135m-afm``) is refused, saying ``fix``: how this command continues that adapter."""
    import afmkit

    model = afmkit.load(name, dtype=dtype or ("float32" if full else None), recovery=False)
    if model.adapter is not None:
        # Training runs over the base weights alone: the adapter this name carries would silently not count.
        raise UserError(
            f"--model {name} loads with an adapter ({model.adapter.name}), which training over its weights would "
            f"ignore; {fix}"
        )
    return model
