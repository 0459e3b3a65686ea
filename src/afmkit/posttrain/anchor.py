"""The anchor: plain text on which the base holds a post-trained policy (``--anchor-text``), for
the recipes whose own data says nothing about such text (DPO's pairs, RL's sampled answers), so
the policy drifts on it (docs/posttraining.md). Windows of ``--anchor-len`` tokens of the text ride
along with the recipe's rows, one per row, each with the base's top ``--anchor-top-k`` next-token
probabilities (the rest lumped), and the objective adds ``--anchor-weight`` times the mean
per-token KL(base || policy) over them for each unit its loss is an average over (DPO's pairs,
MDLOO's and RLOO's samples, PPO-clip's tokens: ``train.objectives.with_anchor``), so the trained
loss is the objective's mean plus W times that KL. Use text the evaluation never reads (not the
perplexity texts that measure the drift)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from afmkit.errors import UserError

# ``train.teacher.text_rows``' fields and their names in an ``AnchoredPolicyBatch``
ANCHOR_FIELDS = {
    "tokens": "anchor_tokens",
    "positions": "anchor_positions",
    "segment_ids": "anchor_segment_ids",
    "loss_mask": "anchor_mask",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnchorSettings:
    """The anchor's settings and defaults, shared by the recipes that take one."""

    anchor_text: str | None = None  # plain text on which the base holds the policy (KL), see the docstring
    anchor_weight: float = 0.0  # times the anchor windows' mean per-token KL(base || policy), per loss unit
    anchor_len: int = 256  # tokens per anchor window (one window per packed row)
    anchor_top_k: int = 32  # the base's most likely tokens kept per position; the rest lumped into one

    def check_anchor(self) -> None:
        if self.anchor_weight < 0:
            raise UserError(f"--anchor-weight must be at least 0, got {self.anchor_weight}")
        if (self.anchor_text is None) != (self.anchor_weight == 0):
            raise UserError("--anchor-text and a positive --anchor-weight go together: give both or neither")
        if self.anchor_len < 2 or self.anchor_top_k < 1:
            raise UserError(
                f"--anchor-len must be at least 2 and --anchor-top-k at least 1, got {self.anchor_len} "
                f"and {self.anchor_top_k}"
            )


def anchor_arguments(parser: Any, defaults: AnchorSettings, *, per: str) -> None:
    """The four ``--anchor-*`` flags; ``per``: what one anchor term is added for ("pair", "sample")."""
    from afmkit.cli_args import setting_argument

    parser.add_argument(
        "--anchor-text",
        default=defaults.anchor_text,
        help=f"plain text on which the base holds the policy: each {per} adds --anchor-weight times the KL of "
        "the policy from the base on windows of it (not a text that measures the drift)",
    )
    setting_argument(parser, defaults, "anchor_weight", "times the anchor windows' mean per-token KL(base || policy)")
    setting_argument(parser, defaults, "anchor_len", "tokens per anchor window, one window per packed row")
    setting_argument(
        parser, defaults, "anchor_top_k", "the base's most likely tokens kept per position, the rest lumped"
    )


def text_windows(model: Any, settings: AnchorSettings, *, at_least: int) -> dict[str, np.ndarray]:
    """``--anchor-text`` cut into windows of ``--anchor-len`` tokens (``train.teacher.text_rows``'
    fields, the ``ANCHOR_FIELDS`` keys); refused in one line below ``at_least`` windows."""
    from afmkit.eval.perplexity import read_text
    from afmkit.train.teacher import text_rows

    path, vocab = settings.anchor_text, model.config.vocab_size
    if not settings.anchor_top_k < vocab:
        raise UserError(f"--anchor-top-k must be below the vocabulary's {vocab} tokens, got {settings.anchor_top_k}")
    windows = text_rows(model.tokenizer.encode(read_text(path)), settings.anchor_len)
    if len(windows["tokens"]) < at_least:
        raise UserError(
            f"--anchor-text {path} holds {len(windows['tokens'])} windows of {settings.anchor_len} tokens; the run "
            f"needs at least {at_least}: give more text or a smaller --anchor-len"
        )
    return {name: windows[name] for name in ANCHOR_FIELDS}


def with_teacher(
    model: Any, windows: dict[str, np.ndarray], settings: AnchorSettings, *, batch: int, quiet: bool
) -> dict[str, np.ndarray]:
    """The anchor fields of ``windows``, the base's top-k added (``model`` as it loaded: not the
    adapter being trained), ``batch`` windows at a time."""
    from afmkit.train.teacher import add_teacher

    rows = add_teacher(model, windows, k=settings.anchor_top_k, batch=batch, quiet=quiet)
    return {ANCHOR_FIELDS.get(name, f"anchor_{name}"): value for name, value in rows.items()}
