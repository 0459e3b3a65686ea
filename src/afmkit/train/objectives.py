"""Training objectives: what the one ``train_step`` minimises.

An objective is a loss over a batch and the model's outputs. It gets a ``ModelView`` (the
model with the trainable subset applied: full weights, or a LoRA adapter over a frozen base), its
own parameters when it has any (a reward model's heads; ``None`` otherwise) and one
(micro)batch, and returns ``(loss_sum, sums)``: sums, never means, with ``sums["count"]`` the
denominator (tokens, pairs or sequences). The step adds microbatches, then divides the loss, the
gradients and every other entry of ``sums`` by the total count, so accumulating gives exactly the
full batch's step. ``afmkit.posttrain.losses`` keeps the same convention for the reward-model
and RL math that ``RewardModel`` and ``Policy`` call.

A batch is any pytree dataclass whose fields lead with rows; ``batch_axes`` names each field's
logical axes for sharding (per-row fields ``[B]`` over ``batch``; per-token ``[B, T]`` over
``batch`` and ``seq``). Objectives:

* ``next_token``: pre-training's cross-entropy on every target of packed rows, plus AFM's z-loss;
* ``assistant_sft``: the same cross-entropy, no z-loss, on the targets the rows' ``loss_mask``
  marks: the assistant's tokens (``afmkit.data.chat``);
* ``RewardModel``: AFM's reward model, a scalar head plus grade heads on the last token
  (``posttrain.losses.reward_model_loss``) on a ``PairBatch``;
* ``Policy``: a sequence-level policy loss (MDLOO, RLOO or PPO-clip) on a ``PolicyBatch`` of
  sampled responses with their advantages and the sampling policy's log-probabilities.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.model.transformer import Params, forward, output_logits, token_nll
from afmkit.sharding.activations import constrain


def default_batch_axes(field: str, rank: int) -> tuple[str | None, ...]:
    """Rows over ``batch``; a second (token) axis over ``seq``; anything further whole."""
    del field
    return ("batch", "seq", *[None] * (rank - 2))[:rank]


@dataclasses.dataclass(frozen=True)
class ModelView:
    """The model as an objective sees it: the trainable subset already applied."""

    config: ModelConfig
    params: Params  # the weights forward runs with (cast to compute_dtype; packed ones as they are)
    adapters: Any  # a LoRA ``SingleAdapter`` or None
    compute_dtype: Any
    dropout: tuple[float, jax.Array] | None = None

    def hidden(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """Final hidden states ``[B, T, d_model]``; ``segment_ids`` keep packed documents apart."""
        hidden, _ = forward(
            self.params,
            tokens,
            positions,
            None,
            config=self.config,
            activation_dtype=self.compute_dtype,
            segment_ids=segment_ids,
            adapters=self.adapters,
            dropout=self.dropout,
        )
        return hidden

    def logits(self, hidden: jax.Array) -> jax.Array:
        return constrain(output_logits(self.params, hidden), ("batch", "seq", "act_vocab"))

    def target_log_probs(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, targets: jax.Array
    ) -> jax.Array:
        """``log p(targets)`` per token ``[B, T]``, fp32."""
        nll, _ = token_nll(self.logits(self.hidden(tokens, positions, segment_ids)), targets)
        return -nll


class Objective(abc.ABC):
    """Base of every objective (see the module docstring): a subclass defines ``loss``."""

    name: str = "objective"
    has_extra: bool = False  # True: ``init_extra`` gives trainable parameters of its own

    def init_extra(self, config: ModelConfig, key: jax.Array) -> Any:
        """The objective's own trainable parameters (a reward model's heads); most have none."""
        del config, key
        return None

    def batch_axes(self, field: str, rank: int) -> tuple[str | None, ...]:
        return default_batch_axes(field, rank)

    @abc.abstractmethod
    def loss(self, model: ModelView, extra: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss_sum, sums)`` over one (micro)batch, ``sums["count"]`` the denominator."""


@dataclasses.dataclass(frozen=True)
class TokenCrossEntropy(Objective):
    """Cross-entropy of ``batch.targets`` where ``batch.loss_mask`` is 1 (a ``train.step.Batch``),
    plus ``z_loss * logsumexp^2`` (AFM's auxiliary loss); ``count`` = learned tokens."""

    z_loss: float = 0.0
    name: str = "next_token"

    def loss(self, model: ModelView, extra: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        del extra
        logits = model.logits(model.hidden(batch.tokens, batch.positions, batch.segment_ids))
        nll, log_z = token_nll(logits, batch.targets)
        mask = batch.loss_mask.astype(jnp.float32)
        ce = (nll * mask).sum()
        z = (jnp.square(log_z) * mask).sum()
        return ce + self.z_loss * z, {"count": mask.sum(), "cross_entropy": ce}


def next_token(config: ModelConfig) -> TokenCrossEntropy:
    """Pre-training: every target of packed rows, with the model size's z-loss (AFM's 1e-6)."""
    return TokenCrossEntropy(z_loss=config.z_loss, name="next_token")


def assistant_sft() -> TokenCrossEntropy:
    """SFT: the assistant's tokens only (rows from ``afmkit.data.chat``), no z-loss."""
    return TokenCrossEntropy(z_loss=0.0, name="sft")


# -- the reward model ------------------------------------------------------------------------
_PER_HEAD_FIELDS = ("chosen_grades", "chosen_grade_mask", "rejected_grades", "rejected_grade_mask")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PairBatch:
    """Preference pairs, right-padded: ``*_tokens [B, T]`` with ``*_lengths [B]`` real tokens
    (the score is read at the last one); ``level [B]`` indexes the preference levels;
    ``pair_mask [B]`` is 0 on padding pairs; ``*_grades``/``*_grade_mask [B, H]`` the grade
    labels (0..2) and where they are present."""

    chosen_tokens: jax.Array
    chosen_lengths: jax.Array
    rejected_tokens: jax.Array
    rejected_lengths: jax.Array
    level: jax.Array
    pair_mask: jax.Array
    chosen_grades: jax.Array
    chosen_grade_mask: jax.Array
    rejected_grades: jax.Array
    rejected_grade_mask: jax.Array


@dataclasses.dataclass(frozen=True)
class RewardModel(Objective):
    """AFM's reward model: ``posttrain.reward_model``'s scalar head and 3-level grade heads on
    the last token's hidden state, sharing the trunk; loss ``posttrain.losses.reward_model_loss`` (soft-label
    Bradley-Terry + ``grade_weight`` x the heads' cross-entropy); ``count`` = pairs."""

    grade_weight: float = 1.0
    name: str = "reward_model"
    has_extra: bool = True

    def init_extra(self, config: ModelConfig, key: jax.Array) -> Any:
        from afmkit.posttrain.reward_model import init_reward_heads

        return init_reward_heads(config, key)

    def batch_axes(self, field: str, rank: int) -> tuple[str | None, ...]:
        return ("batch", None) if field in _PER_HEAD_FIELDS else default_batch_axes(field, rank)

    def scores(
        self, model: ModelView, heads: Any, tokens: jax.Array, lengths: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """The scalar reward ``[B]`` and grade logits ``[B, H, 3]`` of right-padded responses
        (the heads of ``posttrain.reward_model``, read at each row's last token)."""
        from afmkit.posttrain.reward_model import apply_heads

        rows, seq = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
        segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # padding: its own segment 0
        hidden = model.hidden(tokens, positions, segment_ids)
        last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        return apply_heads(heads, last)

    def loss(self, model: ModelView, extra: Any, batch: PairBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
        from afmkit.posttrain.losses import reward_model_loss

        chosen, chosen_grades = self.scores(model, extra, batch.chosen_tokens, batch.chosen_lengths)
        rejected, rejected_grades = self.scores(model, extra, batch.rejected_tokens, batch.rejected_lengths)
        return reward_model_loss(
            chosen,
            rejected,
            batch.level,
            jnp.concatenate([chosen_grades, rejected_grades]),
            jnp.concatenate([batch.chosen_grades, batch.rejected_grades]),
            jnp.concatenate([batch.chosen_grade_mask, batch.rejected_grade_mask]),
            grade_weight=self.grade_weight,
            pair_mask=batch.pair_mask,
        )


# -- sequence-level policy losses ------------------------------------------------------------
POLICY_ALGOS = ("mdloo", "rloo", "ppo-clip")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PolicyBatch:
    """Sampled responses, one per row: prompt + response as ``tokens``/``targets``/``positions``/
    ``segment_ids`` ``[N, T]``; ``loss_mask [N, T]`` 1 on response targets; ``old_log_probs
    [N, T]`` their log-probabilities under the policy that sampled them; ``advantages [N]``."""

    tokens: jax.Array
    targets: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    loss_mask: jax.Array
    old_log_probs: jax.Array
    advantages: jax.Array


@dataclasses.dataclass(frozen=True)
class Policy(Objective):
    """``algo``: ``mdloo`` (mirror descent with a KL trust region of step size ``step_size`` to
    the sampling policy), ``rloo`` (one policy-gradient step) or ``ppo-clip`` (``clip_epsilon``);
    the math is ``posttrain.losses``'."""

    algo: str = "mdloo"
    step_size: float = 1.0
    clip_epsilon: float = 0.2
    name: str = "policy"

    def __post_init__(self) -> None:
        if self.algo not in POLICY_ALGOS:
            raise UserError(f"unknown policy algorithm {self.algo!r}; choose one of {', '.join(POLICY_ALGOS)}")

    def loss(self, model: ModelView, extra: Any, batch: PolicyBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
        from afmkit.posttrain import losses

        del extra
        logp = model.target_log_probs(batch.tokens, batch.positions, batch.segment_ids, batch.targets)
        if self.algo == "mdloo":
            return losses.mdloo_loss(
                logp, batch.old_log_probs, batch.loss_mask, batch.advantages, step_size=self.step_size
            )
        if self.algo == "rloo":
            return losses.rloo_loss(logp, batch.loss_mask, batch.advantages)
        return losses.ppo_clip_loss(
            logp, batch.old_log_probs, batch.loss_mask, batch.advantages, clip_epsilon=self.clip_epsilon
        )
