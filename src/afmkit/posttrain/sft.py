"""``afmkit posttrain sft``: supervised fine-tuning on chat data (AFM_SPEC section 5), a recipe on
the one trainer (``train.finetune`` over ``train.step``).

The loss is next-token cross-entropy on the assistant's tokens only (``train.objectives.
assistant_sft``); conversations are packed into rows with segment ids, so attention never crosses
from one conversation to another (``data.chat``). The learning rate warms up linearly and then
stays constant (AFM's choice for SFT); residual dropout (``--dropout``, AFM: 0.1) is optional.
Train a LoRA adapter over the frozen base (``--lora-rank R``, the default; the base may be the
packed int4 GGUF), continue one (``--init-adapter DIR``: its rank, alpha and targets), or train
every weight (``--full``, on fp32 weights).

Layout of ``--out DIR``::

    adapter_config.json ...     LoRA: the adapter in PEFT's layout (loads in PEFT and afmkit)
    model.safetensors ...       --full: an afmkit checkpoint (``afmkit.load(DIR)``)
    training.json               the settings and the held-out loss before and after
    training/checkpoints/       Orbax steps (trained weights, optimizer state, RNG, data position)
    training/metrics.jsonl      one JSON object per step; training/loss.png the curve
    training/settings.json      the run's settings; ``--resume`` must repeat them

Nothing in DIR is overwritten unless ``--resume`` is given, and every input check runs before
the first write.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from afmkit import cli_args
from afmkit.errors import UserError
from afmkit.posttrain.trunk import SETTINGS_FILE, TrunkSettings, report_unfinished, trunk_run
from afmkit.train.run_directory import check_run_directory, publish, run_identity, write_json

TRAINING_FILE = "training.json"
# Settings that may change on --resume (the rest define the run).
MAY_CHANGE_ON_RESUME = ("steps", "save_every", "keep", "quiet")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatRunSettings(TrunkSettings):
    """The settings of a run over packed chat rows, which ``sft`` and ``dpo`` share (the trunk's
    from ``TrunkSettings``)."""

    steps: int = 200
    lr: float = 2e-4
    warmup: int = 20  # linear warm-up steps, then a constant LR
    batch: int = 8  # packed rows per step
    seq_len: int = 512  # tokens per row; longer conversations are skipped (and counted)
    dropout: float = 0.0  # residual dropout while training (AFM: 0.1)
    weight_decay: float = 0.0
    accum: int = 1
    eval_fraction: float = 0.05
    save_every: int = 50
    keep: int = 2
    mesh: str | None = None  # None: one device
    init_adapter: str | None = None  # continue this adapter (its own rank, alpha and targets)
    seed: int = 0
    resume: bool = False
    quiet: bool = False

    def check(self) -> None:
        super().check()
        for name in ("steps", "batch", "seq_len", "accum", "keep"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must lie in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.warmup < 0 or self.save_every < 0:
            raise UserError("--lr must be positive and --warmup, --save-every non-negative")
        if not 0 < self.eval_fraction < 1:
            raise UserError(f"--eval-fraction must lie in (0, 1), got {self.eval_fraction}")
        if self.full and self.init_adapter is not None:
            raise UserError("--init-adapter continues a LoRA adapter; drop --full or --init-adapter")

    def starting_point(self, model: Any) -> tuple[Any, Any]:
        """``(subset, initial)``: the trainable subset over ``model`` and its starting tree, the
        ``--init-adapter``'s weights (with its rank, alpha and targets) or None (fresh)."""
        subset = self.trainable(model.config)
        if self.init_adapter is None:
            return subset, None
        from afmkit.posttrain.trunk import load_init_adapter
        from afmkit.train.trainable import LoraWeights

        start = load_init_adapter(model, self.init_adapter)
        return LoraWeights(dataclasses.replace(start.config, dtype=subset.lora.dtype)), LoraWeights.tree(start)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTSettings(ChatRunSettings):
    """Every setting of ``afmkit posttrain sft`` and its default: the one source the CLI reads."""

    # weight of the unlikelihood loss on text a chat marks with "unlikely_from" (data.chat); 1 as in
    # Welleck et al. (2019); data without such marks is unaffected
    unlikelihood: float = 1.0

    def check(self) -> None:
        super().check()
        if self.unlikelihood < 0:
            raise UserError(f"--unlikelihood must be at least 0, got {self.unlikelihood}")


def _check_out(out: Path, settings: SFTSettings) -> None:
    """``--out`` against ``--resume``, before anything is written."""
    check_run_directory(
        out, out / SETTINGS_FILE, run_identity(settings, MAY_CHANGE_ON_RESUME), resume=settings.resume, run="SFT"
    )


def sft(
    model: Any, conversations: list[list[dict[str, str]]], out: str | os.PathLike, settings: SFTSettings
) -> dict[str, Any]:
    """Fine-tune ``model`` (a ``LanguageModel``, left unchanged) on ``conversations``; writes
    ``out`` (see the module docstring) and returns the results."""
    from afmkit.adapters.peft_io import save_adapter
    from afmkit.adapters.train import split_examples
    from afmkit.data.chat import pack_conversations
    from afmkit.interop.native import save_checkpoint
    from afmkit.train.finetune import finetune
    from afmkit.train.objectives import assistant_sft

    settings.check()
    out = Path(out)
    subset, initial = settings.starting_point(model)
    train, held_out, too_long, _ = split_examples(
        model,
        conversations,
        max_len=settings.seq_len + 1,
        eval_fraction=settings.eval_fraction,
        length_flag="--seq-len",
    )
    _check_out(out, settings)
    # warm-up, then a constant learning rate
    run = trunk_run(
        settings,
        subset,
        assistant_sft(settings.unlikelihood),
        out,
        final_lr_fraction=1.0,
        dropout=settings.dropout,
        initial=initial,
    )
    write_json(out / SETTINGS_FILE, run_identity(settings, MAY_CHANGE_ON_RESUME))
    trained = finetune(
        model,
        pack_conversations(train, seq_len=settings.seq_len),
        run,
        eval_rows=pack_conversations(held_out, seq_len=settings.seq_len),
    )
    results = {
        "settings": {**dataclasses.asdict(settings), "targets": list(settings.targets)},
        "base": model.name,
        "train_conversations": len(train),
        "held_out_conversations": len(held_out),
        "skipped_too_long": too_long,
        "train_conversations_with_unlikely_text": sum(min(e.mask) < 0 for e in train),
        "steps_done": trained["steps_done"],
        "held_out_loss_start": trained["eval_before"],
        "held_out_loss_end": trained["eval_after"],
        "train_seconds": trained["seconds"],
    }
    extra = {TRAINING_FILE: json.dumps(results, indent=2)}
    if settings.full:

        def write(directory: Path) -> None:
            save_checkpoint(directory, model.config, trained["params"], model.tokenizer)
            for name, text in extra.items():
                (directory / name).write_text(text)
    else:

        def write(directory: Path) -> None:
            adapter = subset.adapter(trained["params"], model.config, name=out.name)
            save_adapter(
                directory, adapter, config=model.config, params=model.params, base_name=model.name, extra_files=extra
            )

    publish(out, write)
    return results


def register(recipes: Any) -> None:
    from afmkit.cli_args import lora_arguments, model_argument, setting_argument

    d = SFTSettings()
    parser = recipes.add_parser("sft", help="supervised fine-tuning on chat JSONL (assistant-only loss, packed)")
    model_argument(parser)
    parser.add_argument("--data", required=True, help="JSONL file: one {'messages': [{role, content}...]} per line")
    parser.add_argument("--out", required=True, help="directory: a PEFT adapter (LoRA) or an afmkit model (--full)")
    lora_arguments(parser, d)
    setting_argument(parser, d, "unlikelihood", "weight of -log(1 - p) on text marked 'unlikely_from' in the data")
    chat_run_arguments(parser, d, rows="tokens per packed row", held_out="held-out share of the conversations")
    parser.set_defaults(run=cmd_sft, trains=True)


def chat_run_arguments(parser: Any, d: ChatRunSettings, *, rows: str, held_out: str) -> None:
    """The flags of ``ChatRunSettings`` (``rows``, ``held_out``: the help of ``--seq-len`` and
    ``--eval-fraction``), which ``sft`` and ``dpo`` share."""
    from afmkit.cli_args import run_arguments, setting_argument

    setting_argument(parser, d, "steps", "optimizer steps")
    setting_argument(parser, d, "lr", "peak (and constant) learning rate")
    setting_argument(parser, d, "warmup", "linear warm-up steps, then constant")
    setting_argument(parser, d, "batch", "packed rows per step")
    setting_argument(parser, d, "seq_len", rows)
    setting_argument(parser, d, "dropout", "residual dropout; AFM uses 0.1")
    setting_argument(parser, d, "weight_decay", "decoupled weight decay")
    setting_argument(parser, d, "accum", "gradient-accumulation microbatches")
    setting_argument(parser, d, "eval_fraction", held_out)
    parser.add_argument(
        "--init-adapter",
        default=None,
        help="continue this LoRA adapter (an SFT/iTeC result) instead of a fresh one; it brings its own rank",
    )
    run_arguments(parser, d, seed="initialisation, dropout and data order")


def settings_from_args(args: Any) -> SFTSettings:
    return cli_args.settings_from_args(SFTSettings, args, targets=cli_args.comma_list(args.targets))


def cmd_sft(args: Any) -> int:
    from afmkit.data.chat import read_chat_jsonl

    settings = settings_from_args(args)
    settings.check()  # one line before loading anything
    conversations = read_chat_jsonl(args.data)
    _check_out(Path(args.out), settings)
    model = cli_args.load_training_base(args.model, args.dtype, full=settings.full)
    results = sft(model, conversations, args.out, settings)
    report_unfinished(results["steps_done"], settings.steps)
    print(
        json.dumps({k: results[k] for k in ("held_out_loss_start", "held_out_loss_end", "steps_done", "train_seconds")})
    )
    return 0
