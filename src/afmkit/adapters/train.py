"""Fine-tune a LoRA adapter on chat data: ``afmkit adapter train``.

An SFT recipe on the one trainer (``train.finetune`` over ``train.step``): the trainable subset
is a LoRA adapter over the frozen base (float, or the packed int4 GGUF weights, QLoRA-style),
the objective assistant-only next-token cross-entropy (``train.objectives.assistant_sft``), and
the conversations (``data.chat``: which tokens are the assistant's comes from the model's chat
template) are packed into rows with segment ids, so conversations never attend to each other.

Data: JSONL, one ``{"messages": [{"role", "content"}, ...]}`` per line. A held-out slice (the
last ``eval_fraction`` of the file) is scored before and after training (before: the fresh
adapter, whose ``B`` is zero, i.e. the base exactly); the numbers are printed and saved with the
adapter (``training.json``). The adapter is saved atomically every ``save_every`` steps and at
the end, in the PEFT layout. The optimizer is the trainer's AdamW (gradients clipped to a global
norm of 1, decoupled weight decay), the LR a linear warm-up then a cosine to a tenth of the peak.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from afmkit import cli_args
from afmkit.adapters.lora import LoraConfig
from afmkit.adapters.peft_io import save_adapter
from afmkit.data.chat import Example, fits, pack_conversations, read_chat_jsonl, tokenize_conversation
from afmkit.errors import UserError

__all__ = ["TRAINING_FILE", "TrainSettings", "train_adapter"]

TRAINING_FILE = "training.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Every setting of ``afmkit adapter train`` and its default: the one source the CLI reads."""

    rank: int = LoraConfig.rank
    alpha: float | None = None  # None: 2 x rank (LoRA's usual scale of 2)
    targets: tuple[str, ...] = LoraConfig.targets
    layers: tuple[int, ...] | None = None  # None: every layer
    steps: int = 200
    lr: float = 2e-4
    batch: int = 8  # packed rows per step (each holds one or more whole conversations)
    max_len: int = 512
    warmup: int = 10
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    save_every: int = 50
    seed: int = 0
    init_from_recovery: bool = False  # start from the compressed model's recovery adapter (its rank and targets)

    def __post_init__(self) -> None:
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.0 * self.rank)


def split_examples(
    model: Any,
    conversations: list[list[dict[str, str]]],
    *,
    max_len: int,
    eval_fraction: float,
    length_flag: str = "--max-len",
) -> tuple[list[Example], list[Example], int, int]:
    """Tokenized (train, held-out) conversations of at most ``max_len`` tokens with assistant
    tokens, the count dropped as too long, and the row length (the longest, rounded up to 32)."""
    examples = [tokenize_conversation(model.tokenizer, c) for c in conversations]
    too_long = sum(len(e.ids) > max_len for e in examples)
    examples = [e for e in examples if len(e.ids) <= max_len and any(e.mask)]
    if len(examples) < 2:
        raise UserError(
            f"need at least 2 usable conversations of at most {max_len} tokens ({too_long} were longer); "
            f"raise {length_flag} or add data"
        )
    n_eval = max(1, round(len(examples) * eval_fraction))
    train, held_out = examples[:-n_eval], examples[-n_eval:]
    if not train:
        raise UserError("no training conversations left after the held-out split; lower --eval-fraction")
    length = min(max_len, -(-max(len(e.ids) for e in examples) // 32) * 32)
    assert all(fits(e, length) for e in examples)
    return train, held_out, too_long, length


def train_adapter(
    model: Any,
    conversations: list[list[dict[str, str]]],
    out: str | os.PathLike,
    settings: TrainSettings,
    *,
    name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Train an adapter for ``model`` (a ``LanguageModel``) and save it to ``out``; returns the results."""
    from afmkit.train.finetune import FinetuneRun, finetune
    from afmkit.train.objectives import assistant_sft
    from afmkit.train.optim import OptimizerConfig
    from afmkit.train.step import StepConfig
    from afmkit.train.trainable import LoraWeights

    if settings.steps < 1 or settings.batch < 1:
        raise UserError("--steps and --batch must be positive")
    lora = LoraConfig(
        rank=settings.rank, alpha=settings.alpha, targets=settings.targets, layers=settings.layers, dtype="float16"
    )
    initial = None
    if settings.init_from_recovery:
        recovery = model.adapter  # a compressed model's recovery adapter, applied when it loads
        if recovery is None:
            raise UserError(
                f"--init-from-recovery: {model.name} has no recovery adapter; "
                "run 'afmkit compress recover --model DIR' on the compressed model first"
            )
        # The task adapter continues the recovery adapter (AFM's recipe), so it takes its shape.
        lora = dataclasses.replace(recovery.config, dtype="float16")
        initial = LoraWeights.tree(recovery)
    lora.layer_ids(model.config)
    train, held_out, too_long, length = split_examples(
        model, conversations, max_len=settings.max_len, eval_fraction=settings.eval_fraction
    )
    subset = LoraWeights(lora)
    run = FinetuneRun(
        subset=subset,
        objective=assistant_sft(),
        optimizer=OptimizerConfig(
            name="adamw",
            peak_lr=settings.lr,
            warmup_steps=min(settings.warmup, settings.steps - 1),
            total_steps=settings.steps,
            final_lr_fraction=0.1,
            weight_decay=settings.weight_decay,
        ),
        step_config=StepConfig(),
        batch=settings.batch,
        steps=settings.steps,
        seed=settings.seed,
        save_every=settings.save_every,
        progress=progress,
        initial=initial,
    )
    results: dict[str, Any] = {
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        "train_conversations": len(train),
        "held_out_conversations": len(held_out),
        "sequence_length": length,
        "skipped_too_long": too_long,
    }

    def save(params: Any, done: int) -> None:
        results["steps_done"] = done
        save_adapter(
            out,
            subset.adapter(params, model.config, name=name),
            config=model.config,
            params=model.params,
            base_name=model.name,
            extra_files={TRAINING_FILE: json.dumps(results, indent=2)},
        )

    def save_before_the_end(params: Any, done: int) -> None:
        if done < settings.steps:  # the last save comes below, with the held-out loss after training
            save(params, done)

    trained = finetune(
        model,
        pack_conversations(train, seq_len=length),
        run,
        eval_rows=pack_conversations(held_out, seq_len=length),
        on_save=save_before_the_end,
    )
    losses = trained["losses"]
    results["held_out_loss_base"] = trained["eval_before"]
    results["held_out_loss_adapter"] = trained["eval_after"]
    results["train_seconds"] = trained["seconds"]
    results["train_loss_first10"] = float(np.mean(losses[:10]))
    results["train_loss_last10"] = float(np.mean(losses[-10:]))
    print(f"held-out loss before training (base model): {results['held_out_loss_base']:.4f}")
    print(f"held-out loss after training (with the adapter): {results['held_out_loss_adapter']:.4f}")
    save(trained["params"], trained["steps_done"])
    return results


def _int_list(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        values: list[int] = []
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                values.extend(range(int(lo), int(hi) + 1))
            else:
                values.append(int(part))
        return tuple(values)
    except ValueError:
        raise UserError(f"--layers takes comma-separated layer numbers or ranges like 0-5,10; got {text!r}") from None


def register(commands: Any) -> None:
    from afmkit.cli_args import model_argument

    adapter = commands.add_parser("adapter", help="LoRA adapters: train, mix")
    actions = adapter.add_subparsers(required=True, metavar="ACTION")
    train = actions.add_parser("train", help="fine-tune a LoRA adapter on chat data (JSONL)")
    model_argument(train)
    add_train_arguments(train)
    train.set_defaults(run=cmd_adapter_train, trains=True)
    mix = actions.add_parser(
        "mix", help="one adapter whose update is a weighted sum of adapters' updates (e.g. 0.5,0.5 interpolates)"
    )
    model_argument(mix)
    mix.add_argument("--adapters", required=True, help="comma-separated adapter directories of one base model")
    mix.add_argument("--weights", required=True, help="comma-separated weights, one per adapter, e.g. 0.4,0.6")
    mix.add_argument("--out", required=True, help="adapter directory to write (PEFT layout; rank = sum of ranks)")
    mix.set_defaults(run=cmd_adapter_mix)


def add_train_arguments(parser: Any) -> None:
    """The flags of ``adapter train``; every default (and the number its help quotes) is ``TrainSettings``'s."""
    from afmkit.cli_args import lora_arguments, run_arguments, setting_argument

    d = TrainSettings()
    parser.add_argument("--data", required=True, help="JSONL file: one {'messages': [{role, content}...]} per line")
    parser.add_argument("--out", required=True, help="adapter directory to write (PEFT layout)")
    lora_arguments(parser, d)
    parser.add_argument("--layers", help="layers to adapt, e.g. 0-5,10 (default: all)")
    setting_argument(parser, d, "steps", "optimizer steps")
    setting_argument(parser, d, "lr", "peak learning rate")
    setting_argument(parser, d, "warmup", "linear warmup steps")
    setting_argument(parser, d, "weight_decay", "AdamW weight decay")
    setting_argument(parser, d, "batch", "conversations per step")
    setting_argument(parser, d, "max_len", "longest conversation in tokens")
    setting_argument(parser, d, "eval_fraction", "held-out share of the data")
    setting_argument(
        parser,
        d,
        "init_from_recovery",
        "start from the compressed model's accuracy-recovery adapter (its rank, alpha and targets)",
    )
    run_arguments(parser, d, seed="adapter init and data order", save_every="save the adapter every N steps")


def settings_from_args(args: Any) -> TrainSettings:
    """``TrainSettings`` from parsed ``adapter train`` flags."""
    return cli_args.settings_from_args(
        TrainSettings, args, targets=cli_args.comma_list(args.targets), layers=_int_list(args.layers)
    )


def cmd_adapter_train(args: Any) -> int:
    import afmkit

    settings = settings_from_args(args)
    LoraConfig(rank=settings.rank, alpha=settings.alpha, targets=settings.targets)  # validate before loading
    conversations = read_chat_jsonl(args.data)
    # The adapter is trained against the base at --dtype (int4: the GGUF's own 4-bit weights,
    # QLoRA-style); its fingerprint is the same for every lossless load of that base. A new adapter
    # trains over the weights alone, so a model that loads with an adapter is refused unless
    # --init-from-recovery continues it.
    if settings.init_from_recovery:
        model = afmkit.load(args.model, dtype=args.dtype)
    else:
        model = cli_args.load_training_base(
            args.model, args.dtype, fix="add --init-from-recovery to continue that adapter"
        )
    results = train_adapter(model, conversations, args.out, settings, name=Path(args.out).name)
    print(
        json.dumps(
            {
                k: results[k]
                for k in ("held_out_loss_base", "held_out_loss_adapter", "train_seconds", "train_conversations")
            }
        )
    )
    return 0


def cmd_adapter_mix(args: Any) -> int:
    import math

    import afmkit
    from afmkit.adapters.lora import mix
    from afmkit.adapters.peft_io import load_adapter

    paths = cli_args.comma_list(args.adapters)
    try:
        weights = [float(w) for w in cli_args.comma_list(args.weights)]
    except ValueError:
        raise UserError(f"--weights takes comma-separated numbers like 0.4,0.6; got {args.weights!r}") from None
    if len(paths) < 2:
        raise UserError(f"--adapters needs two or more adapter directories, comma-separated; got {args.adapters!r}")
    if len(weights) != len(paths) or not all(math.isfinite(w) for w in weights):
        raise UserError(f"--weights needs one finite number per adapter ({len(paths)}); got {args.weights!r}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # save_adapter replaces a directory whole: never an input adapter or other saved work
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory")
    model = afmkit.load(args.model, dtype=args.dtype)
    adapters = [load_adapter(p, config=model.config, params=model.params) for p in paths]
    mixed = mix(adapters, weights, name=Path(args.out).name)
    recipe = {"adapters": [str(Path(p).resolve()) for p in paths], "weights": weights}
    save_adapter(
        args.out,
        mixed,
        config=model.config,
        params=model.params,
        extra_files={"mix.json": json.dumps(recipe, indent=2)},
    )
    print(f"wrote {args.out}: rank {mixed.config.rank}, {mixed.nbytes / 2**20:.1f} MiB")
    return 0
