"""What SFT (``posttrain.sft``) and the reward model (``posttrain.reward``) share: the trunk they
train over the base model (a LoRA adapter over the frozen base, or every weight), its run on the
one trainer (``train.finetune``), and the command's steps around it."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from afmkit.adapters.lora import TARGETS, LoraConfig
from afmkit.errors import UserError

RUN_DIR = "training"  # in --out: checkpoints/, metrics.jsonl, loss.png and settings.json
SETTINGS_FILE = f"{RUN_DIR}/settings.json"  # the run's settings; --resume must repeat them


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrunkSettings:
    """The trunk's settings, the first fields of ``SFTSettings`` and ``RewardSettings``."""

    lora_rank: int = 16
    full: bool = False  # train every weight instead of a LoRA adapter
    alpha: float | None = None  # None: 2 x rank
    targets: tuple[str, ...] = tuple(TARGETS)

    def check(self) -> None:
        """Refuse a bad rank, target or alpha in one line, before anything loads."""
        if not self.full:
            if self.lora_rank < 1:
                raise UserError(
                    f"--lora-rank must be at least 1, got {self.lora_rank} (or train every weight with --full)"
                )
            self.lora()

    def lora(self) -> LoraConfig:
        alpha = self.alpha if self.alpha is not None else 2.0 * self.lora_rank
        return LoraConfig(rank=self.lora_rank, alpha=alpha, targets=self.targets, dtype="float16")

    def trainable(self, config: Any) -> Any:
        """The trainable subset (``train.trainable``) for a model of ``config``, whose layers
        the adapter's must fit."""
        from afmkit.train.trainable import FULL, LoraWeights

        if self.full:
            return FULL
        lora = self.lora()
        lora.layer_ids(config)
        return LoraWeights(lora)


def trunk_run(
    settings: Any, subset: Any, objective: Any, out: Path, *, final_lr_fraction: float, dropout: float = 0.0, **options
) -> Any:
    """The ``train.finetune.FinetuneRun`` of ``settings`` (an ``SFTSettings`` or
    ``RewardSettings``) into ``out / RUN_DIR``: AdamW warming up linearly to ``settings.lr``,
    then a cosine to ``final_lr_fraction`` of it (1: constant); ``options``: the run's other
    fields."""
    from afmkit.train.finetune import FinetuneRun
    from afmkit.train.optim import OptimizerConfig
    from afmkit.train.step import StepConfig

    return FinetuneRun(
        subset=subset,
        objective=objective,
        optimizer=OptimizerConfig(
            name="adamw",
            peak_lr=settings.lr,
            warmup_steps=settings.warmup,
            total_steps=max(settings.steps, settings.warmup + 1),
            final_lr_fraction=final_lr_fraction,
            weight_decay=settings.weight_decay,
        ),
        step_config=StepConfig(accum_steps=settings.accum, dropout=dropout),
        batch=settings.batch,
        steps=settings.steps,
        seed=settings.seed,
        mesh=settings.mesh,
        run_dir=out / RUN_DIR,
        save_every=settings.save_every,
        keep=settings.keep,
        resume=settings.resume,
        progress=not settings.quiet,
        **options,
    )


def load_init_adapter(base: Any, path: str | Path, *, flag: str = "--init-adapter") -> Any:
    """An SFT/iTeC adapter to start from (``flag``; refused in one line if it is not an adapter
    directory or was made for another base)."""
    from afmkit.adapters.peft_io import CONFIG_FILE, load_adapter

    path = Path(path).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{flag} {path} is not an adapter directory (no {CONFIG_FILE}); give one")
    return load_adapter(path, config=base.config, params=base.params, name=path.name)


def report_unfinished(steps_done: int, steps: int) -> None:
    """Say on stderr how to continue a run that stopped early (its output holds the last step)."""
    if steps_done < steps:
        print(
            f"afmkit: stopped at step {steps_done} of {steps}; the output holds that step. "
            "Continue with the same command plus --resume",
            file=sys.stderr,
        )
