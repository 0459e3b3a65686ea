"""``afmkit posttrain reward``: AFM's reward model (AFM_SPEC section 5), a recipe on the one
trainer (``train.finetune`` over ``train.step`` with the ``RewardModel`` objective).

The trunk (a LoRA adapter over the frozen base, ``--lora-rank R``, the default; or every weight,
``--full``) and the heads of ``posttrain.reward_model`` learn together from preference pairs:
soft-label Bradley-Terry over the four preference levels plus ``--grade-weight`` (lambda) times
the grade heads' cross-entropy where a pair has grades (``posttrain.losses``).

``--data`` is a comma-separated list of sources (``preference_data.load_pair_sources``): pairs
JSONL files, ``hh-rlhf`` (the shared hh-rlhf dialogues) and iTeC run directories (their sampled
responses paired by the verifiable reward). A held-out part (``--test-fraction``, chosen by a
hash of the prompt, so a prompt never straddles it) is never trained on; after training every
held-out pair is scored, whatever its length, and its pair accuracy is reported overall and
per source, printed and in ``report.json``.

Layout of ``--out DIR``::

    reward_model.json ...     the reward model (``reward_model.save_reward_model``): heads,
                              base and tokenizer fingerprints, the trunk (a PEFT adapter, or
                              an afmkit checkpoint with --full); ``load_reward_model(DIR, base)``
    report.json               settings, data counts, held-out accuracy (all and per source)
    training/checkpoints/     Orbax steps (exact resume); training/metrics.jsonl, loss.png
    training/settings.json    the run's settings; ``--resume`` must repeat them

Nothing in DIR is overwritten unless ``--resume`` is given, and every input check runs before
the first write.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afmkit import cli_args
from afmkit.errors import UserError
from afmkit.posttrain.trunk import SETTINGS_FILE, TrunkSettings, report_unfinished, trunk_run
from afmkit.train.run_directory import check_run_directory, publish, run_identity, write_json

REPORT_FILE = "report.json"
# Settings that may change on --resume (the rest define the run).
MAY_CHANGE_ON_RESUME = ("steps", "save_every", "keep", "quiet", "held_out_limit")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardSettings(TrunkSettings):
    """Every setting of ``afmkit posttrain reward`` and its default (the trunk's from
    ``TrunkSettings``): the one source the CLI reads."""

    steps: int = 200
    lr: float = 1e-4
    warmup: int = 10  # linear warm-up steps, then a cosine decay to a tenth of the peak
    batch: int = 8  # pairs per step (each pair is two rows: chosen and rejected)
    max_tokens: int = 384  # longest conversation trained on; longer pairs are skipped (and counted)
    grade_weight: float = 1.0  # lambda: weight of the grade heads' cross-entropy (AFM does not publish it)
    test_fraction: float = 0.1  # held-out share of the prompts (never trained on)
    held_out_limit: int = 0  # score only this many held-out pairs (0: all), a quicker, noisier report
    weight_decay: float = 0.0
    accum: int = 1
    save_every: int = 50
    keep: int = 2
    mesh: str | None = None  # None: one device
    seed: int = 0
    resume: bool = False
    quiet: bool = False

    def check(self) -> None:
        super().check()
        if self.held_out_limit < 0:
            raise UserError(f"--held-out-limit must be 0 (all) or more, got {self.held_out_limit}")
        for name in ("steps", "batch", "max_tokens", "accum", "keep"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or self.save_every < 0 or self.grade_weight < 0:
            raise UserError("--lr must be positive and --warmup, --save-every, --grade-weight non-negative")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"--test-fraction must lie in (0, 1), got {self.test_fraction}")


def _check_out(out: Path, settings: RewardSettings) -> None:
    """``--out`` against ``--resume``, before anything is written."""
    identity = run_identity(settings, MAY_CHANGE_ON_RESUME)
    check_run_directory(out, out / SETTINGS_FILE, identity, resume=settings.resume, run="reward-model")


# -- held-out evaluation -----------------------------------------------------------------------
def source_group(source: str) -> str:
    """The part of a pair's ``source`` that names where it came from: ``file.jsonl:12`` ->
    ``file.jsonl`` (a line or prompt id after the last colon is dropped)."""
    head, sep, _ = source.rpartition(":")
    return head if sep and head else source


def pair_scores(scorer: Any, pairs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each pair's chosen and rejected conversation ``([N], [N])`` by a
    ``reward_model.RewardModel``."""
    chosen = [[*p.prompt, {"role": "assistant", "content": p.chosen}] for p in pairs]
    rejected = [[*p.prompt, {"role": "assistant", "content": p.rejected}] for p in pairs]
    scores = scorer.score(chosen + rejected)
    return scores[: len(pairs)], scores[len(pairs) :]


def accuracy_summary(correct: np.ndarray) -> dict[str, float | int]:
    """Pair accuracy with its binomial standard error ``sqrt(p (1 - p) / n)``."""
    n = len(correct)
    p = float(np.mean(correct)) if n else float("nan")
    return {"pairs": n, "accuracy": p, "stderr": math.sqrt(p * (1 - p) / n) if n else float("nan")}


def evaluate_pairs(scorer: Any, pairs: Sequence[Any]) -> dict[str, Any]:
    """Held-out metrics of a reward model: pair accuracy (chosen scored strictly above rejected,
    as the training metric counts it; a tie is wrong), overall and per ``source_group``, ties,
    mean margin and the mean soft-label Bradley-Terry loss (``losses.reward_pair_loss``)."""
    import jax.numpy as jnp

    from afmkit.posttrain.losses import reward_pair_loss

    chosen, rejected = pair_scores(scorer, pairs)
    margin = chosen - rejected
    correct = margin > 0
    levels = jnp.asarray([p.level for p in pairs], jnp.int32)
    loss = reward_pair_loss(jnp.asarray(chosen), jnp.asarray(rejected), levels)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(source_group(p.source), []).append(i)
    return {
        **accuracy_summary(correct),
        "ties": int(np.sum(margin == 0)),
        "mean_margin": float(np.mean(margin)),
        "loss": float(np.mean(np.asarray(loss))),
        "by_source": {name: accuracy_summary(correct[idx]) for name, idx in sorted(groups.items())},
    }


def format_report(report: dict[str, Any]) -> str:
    held = report["held_out"]
    lines = [
        f"held-out pair accuracy {100 * held['accuracy']:.1f}% +- {100 * held['stderr']:.1f}% "
        f"({held['pairs']} pairs, loss {held['loss']:.4f}, {report['steps_done']} steps, "
        f"{report['train_seconds']:.0f} s)"
    ]
    for name, row in held["by_source"].items():
        lines.append(f"  {name}: {100 * row['accuracy']:.1f}% +- {100 * row['stderr']:.1f}% ({row['pairs']} pairs)")
    return "\n".join(lines)


# -- the recipe --------------------------------------------------------------------------------
def held_out_sample(test: Sequence[Any], limit: int) -> list[Any]:
    """All held-out pairs (``limit`` 0), or ``limit`` of them in the order of their prompts'
    hashes: a fixed sample spread over every source, the same for every run on the same data."""
    from afmkit.posttrain.preference_data import prompt_key

    if not limit or limit >= len(test):
        return list(test)
    ranked = sorted(range(len(test)), key=lambda i: (prompt_key(test[i].prompt), i))
    return [test[i] for i in sorted(ranked[:limit])]


def split_for_training(pairs: Sequence[Any], settings: RewardSettings) -> tuple[list[Any], list[Any]]:
    """(train, held-out) by ``preference_data.split_pairs``; refused with one line when either
    side is empty."""
    from afmkit.posttrain.preference_data import split_pairs

    if not pairs:
        raise UserError("no preference pairs to train on; give --data with at least one pair")
    train, test = split_pairs(pairs, test_fraction=settings.test_fraction)
    if not test:
        raise UserError(
            f"none of the {len(pairs)} pairs' prompts fell in the held-out {settings.test_fraction:g}; "
            "add pairs with more distinct prompts or raise --test-fraction"
        )
    if not train:
        raise UserError(f"all {len(pairs)} pairs were held out; add data or lower --test-fraction")
    return train, test


def train_reward_model(
    model: Any, pairs: Sequence[Any], out: str | os.PathLike, settings: RewardSettings, *, base_name: str = ""
) -> dict[str, Any]:
    """Train a reward model on ``model`` (a ``LanguageModel``, left unchanged) from ``pairs``
    (``preference_data.PreferencePair``); writes ``out`` (see the module docstring) and returns
    the report. ``base_name``: how to load the base again (a name or path; default the model's
    name), recorded for the graders that load the reward model."""
    from afmkit.posttrain.preference_data import pair_batch, tokenize_pairs
    from afmkit.posttrain.reward_model import RewardModel as Scorer
    from afmkit.posttrain.reward_model import save_reward_model
    from afmkit.train.finetune import finetune
    from afmkit.train.objectives import PairBatch, RewardModel

    settings.check()
    out = Path(out)
    subset = settings.trainable(model.config)
    train, test = split_for_training(pairs, settings)
    tokenized, too_long = tokenize_pairs(model.tokenizer, train, max_len=settings.max_tokens)
    if not tokenized:
        raise UserError(f"all {len(train)} training pairs are longer than --max-tokens {settings.max_tokens}; raise it")
    _check_out(out, settings)
    rows = pair_batch(tokenized, rows=len(tokenized), length=settings.max_tokens)
    objective = RewardModel(grade_weight=settings.grade_weight)
    run = trunk_run(settings, subset, objective, out, final_lr_fraction=0.1, batch_type=PairBatch, eval_metric="loss")
    write_json(out / SETTINGS_FILE, run_identity(settings, MAY_CHANGE_ON_RESUME))
    trained = finetune(model, rows, run)
    weights, heads = trained["params"]["weights"], trained["params"]["extra"]
    adapter = None if settings.full else subset.adapter(weights, model.config, name=out.name)
    # Score the held-out pairs with the model as it is saved (the adapter in its fp16 storage).
    scorer = Scorer(
        config=model.config,
        params=weights if settings.full else model.params,
        heads=heads,
        tokenizer=model.tokenizer,
        adapter=adapter,
        name=out.name,
    )
    losses = trained["losses"]
    report = {
        "settings": {**dataclasses.asdict(settings), "targets": list(settings.targets)},
        "base": model.name,
        "pairs": len(pairs),
        "train_pairs": len(train),
        "trained_pairs": len(tokenized),
        "skipped_too_long": too_long,
        "steps_done": trained["steps_done"],
        "train_seconds": trained["seconds"],
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last_10": float(np.mean(losses[-10:])) if losses else None,
        "held_out_pairs_total": len(test),
        "held_out": evaluate_pairs(scorer, held_out_sample(test, settings.held_out_limit)),
    }

    def write(directory: Path) -> None:
        save_reward_model(
            directory,
            heads,
            config=model.config,
            base_params=model.params,
            tokenizer=model.tokenizer,
            adapter=adapter,
            trunk_params=weights if settings.full else None,
            base_name=base_name or model.name,
            extra_files={REPORT_FILE: json.dumps(report, indent=2)},
        )

    publish(out, write)
    return report


# -- command -----------------------------------------------------------------------------------
def register(recipes: Any) -> None:
    from afmkit.cli_args import lora_arguments, model_argument, run_arguments, setting_argument

    d = RewardSettings()
    parser = recipes.add_parser(
        "reward", help="AFM's reward model: soft-label Bradley-Terry + grade heads on preference pairs"
    )
    model_argument(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="comma-separated sources: pairs JSONL files, 'hh-rlhf' (the shared dialogues), "
        "iTeC run directories (responses paired by the verifiable reward)",
    )
    parser.add_argument("--out", required=True, help="directory of the reward model (and report.json)")
    lora_arguments(parser, d)
    setting_argument(parser, d, "steps", "optimizer steps")
    setting_argument(parser, d, "lr", "peak learning rate")
    setting_argument(parser, d, "warmup", "linear warm-up steps, then cosine decay")
    setting_argument(parser, d, "batch", "pairs per step")
    setting_argument(parser, d, "max_tokens", "longest conversation trained on; longer pairs are skipped")
    setting_argument(parser, d, "grade_weight", "lambda, the grade heads' cross-entropy weight")
    setting_argument(parser, d, "test_fraction", "held-out share of the prompts, never trained on")
    setting_argument(parser, d, "held_out_limit", "score only N held-out pairs, a fixed sample; 0 = all")
    setting_argument(parser, d, "weight_decay", "decoupled weight decay")
    setting_argument(parser, d, "accum", "gradient-accumulation microbatches")
    run_arguments(parser, d, seed="initialisation and data order")
    parser.set_defaults(run=cmd_reward, trains=True)


def settings_from_args(args: Any) -> RewardSettings:
    return cli_args.settings_from_args(RewardSettings, args, targets=cli_args.comma_list(args.targets))


def cmd_reward(args: Any) -> int:
    from afmkit.posttrain.preference_data import load_pair_sources

    settings = settings_from_args(args)
    settings.check()  # one line before loading anything
    pairs = load_pair_sources(args.data)
    split_for_training(pairs, settings)  # an empty side: one line before loading the model
    _check_out(Path(args.out), settings)
    model = cli_args.load_training_base(args.model, args.dtype, full=settings.full)
    named = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
    report = train_reward_model(model, pairs, args.out, settings, base_name=named)
    report_unfinished(report["steps_done"], settings.steps)
    print(format_report(report))
    return 0
