"""The settings of ``afmkit pretrain``: ``PretrainConfig`` (the one source of every default, read
by the CLI), the ``--recipe`` presets, and the command line that resumes a run.

This module imports no JAX, so building the CLI parser stays fast.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from afmkit.errors import UserError

DEFAULT_TOKENIZER = "smollm2-135m-instruct"
# Settings that define a run: a resume must use the same ones.
RUN_IDENTITY = (
    "model",
    "tokenizer",
    "data",
    "steps",
    "batch",
    "seq_len",
    "lr",
    "optimizer",
    "warmup",
    "final_lr_fraction",
    "weight_decay",
    "accum",
    "seed",
    "z_loss",
    "compute_dtype",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Every setting of ``afmkit pretrain``; the one source of its defaults (the CLI reads them
    from here, and ``tests/train/test_pretrain_defaults.py`` checks that it does)."""

    out: str
    model: str = "afm-tiny"
    tokenizer: str = DEFAULT_TOKENIZER
    data: tuple[str, ...] | None = None  # None: the Python standard library's sources
    mesh: str | None = None  # None: every device on the data axis
    steps: int = 100
    batch: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    optimizer: str = "adamw"
    warmup: int | None = None  # None: 10% of the steps, at most 100
    final_lr_fraction: float = 0.1
    # decoupled, per step at the peak LR, not multiplied by the LR (AFM's value; see train.optim)
    weight_decay: float = 3.16e-4
    accum: int = 1
    seed: int = 0
    z_loss: float | None = None  # None: the model size's ModelConfig.z_loss (AFM's 1e-6)
    compute_dtype: str | None = None  # None: float32 on CPUs, bfloat16 on accelerators
    save_every: int = 25
    keep: int = 3
    resume: bool = False
    metrics: str | None = None
    eval_every: int = 0
    eval_batches: int = 2
    profile_dir: str | None = None
    profile_steps: str = "3:6"
    peak_tflops: float | None = None
    log_every: int | None = None  # None: a log line every 5% of the steps when stderr is not a terminal
    quiet: bool = False

    @classmethod
    def from_recipe(cls, recipe: str | None, **settings: Any) -> PretrainConfig:
        """The dataclass's defaults, overridden by the recipe's values, overridden by ``settings``."""
        if recipe is None:
            return cls(**settings)
        if recipe not in RECIPES:
            raise UserError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
        return cls(**{**RECIPES[recipe], **settings})

    def resolved(self) -> PretrainConfig:
        from afmkit.config import get_size

        warmup = self.warmup if self.warmup is not None else default_warmup(self.steps)
        import jax

        dtype = self.compute_dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        data = tuple(str(Path(d).absolute()) if not any(c in d for c in "*?[") else d for d in self.data or ())
        z_loss = self.z_loss if self.z_loss is not None else get_size(self.model).z_loss
        return dataclasses.replace(self, warmup=warmup, compute_dtype=dtype, data=data or None, z_loss=z_loss)

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = list(d["data"]) if d["data"] else None
        return {k: d[k] for k in RUN_IDENTITY}


def default_warmup(steps: int) -> int:
    """The warm-up when none is given: 10% of the steps, at most 100."""
    return min(100, steps // 10)


# Presets of PretrainConfig fields (``--recipe``); flags given explicitly override them.
RECIPES: dict[str, dict[str, Any]] = {
    # AFM's core pre-training stage (AFM_SPEC section 3): its RMSProp-momentum optimizer, peak
    # LR 0.01, decoupled weight decay 3.16e-4, cosine to 0.005 x peak, z-loss 1e-6 (the model
    # size's). Scaled down for a CPU (our choice): sequences of 256 tokens instead of 4,096 and a
    # batch of 8 instead of 4,096; the warm-up is 10% of --steps (at most 100) instead of 5,000
    # steps, since a run of a few hundred steps has no room for AFM's.
    "afm-core": {
        "optimizer": "afm",
        "lr": 0.01,
        "weight_decay": 3.16e-4,
        "final_lr_fraction": 0.005,
        "batch": 8,
        "seq_len": 256,
    },
}
# Fields that are not command-line options.
NOT_ON_CLI = ("eval_batches",)


def resume_command(cfg: PretrainConfig) -> str:
    """The ``afmkit pretrain ... --resume`` command line that continues the run ``cfg``."""
    import shlex

    defaults = PretrainConfig(out=cfg.out)
    words = ["afmkit", "pretrain"]
    for field in dataclasses.fields(PretrainConfig):
        value = getattr(cfg, field.name)
        left_out = field.name in (*NOT_ON_CLI, "resume", "quiet") or value in (None, getattr(defaults, field.name))
        if left_out and field.name != "out":
            continue
        flag = "--" + field.name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, tuple):
            words += [flag, *value]
        else:
            words += [flag, str(value)]
    return shlex.join([*words, "--resume"])
