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
  marks: the assistant's tokens (``afmkit.data.chat``); targets marked -1 (text the model must
  not say, e.g. the rest of a repetition loop) get the unlikelihood loss ``-log(1 - p)`` (Welleck
  et al. 2019, sequence-level) times ``unlikelihood``;
* ``Distillation``: KL(teacher || student) over next-token distributions, the teacher's top-k
  probabilities plus its tail lumped into one bucket, given with the rows (``DistillBatch``;
  ``teacher_top_k`` makes them): the accuracy-recovery adapter's objective (``compress.recover``);
* ``RewardModel``: AFM's reward model, a scalar head plus grade heads on the last token
  (``posttrain.losses.reward_model_loss``) on a ``PairBatch``;
* ``Policy``: a sequence-level policy loss (MDLOO, RLOO or PPO-clip) on a ``PolicyBatch`` of
  sampled responses with their advantages and the sampling policy's log-probabilities; with
  ``anchor_weight``, plus the anchor's KL (as ``Preference``'s);
* ``Preference``: DPO on pairs of responses to one prompt, packed as a ``PolicyBatch`` (the
  reference policy's log-probabilities in ``old_log_probs``, +1 / -1 per response in
  ``advantages``); with ``anchor_weight``, plus the ``Distillation`` KL on windows of plain text
  carried beside the rows (``AnchoredPolicyBatch``, ``anchor_kl``; ``posttrain.anchor``).

Every objective turns hidden states into vocabulary log-probabilities in chunks of ``seq_chunk``
positions (``ModelView.per_token``): the output projection and log-softmax of one chunk at a
time, each recomputed in the backward pass (``jax.checkpoint``), so neither direction holds
``[batch, seq, vocab]`` logits at once (SFT at 4 x 1,024 tokens on a 49k vocabulary needed 10 GB
for them alone).
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

SEQ_CHUNK = 128  # positions per chunk of logits: [rows, 128, vocab] fp32 is 25 MB per row at 49k


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
    recompute: bool = False  # gradients recompute each layer's activations (``transformer.forward``)

    def hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        branch_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states ``[B, T, d_model]``; ``segment_ids`` keep packed documents apart,
        ``branch_ids`` let continuations share a prefix (``transformer.forward``)."""
        hidden, _ = forward(
            self.params,
            tokens,
            positions,
            None,
            config=self.config,
            activation_dtype=self.compute_dtype,
            segment_ids=segment_ids,
            branch_ids=branch_ids,
            adapters=self.adapters,
            dropout=self.dropout,
            recompute=self.recompute,
        )
        return hidden

    def logits(self, hidden: jax.Array) -> jax.Array:
        return constrain(output_logits(self.params, hidden), ("batch", "seq", "act_vocab"))

    def per_token(self, fn: Any, hidden: jax.Array, *per_position: Any, seq_chunk: int = SEQ_CHUNK) -> Any:
        """``fn(logits [B, c, V], *per_position chunks)`` over the sequence in chunks of
        ``seq_chunk`` positions, its outputs (``[B, c, ...]`` each) put back together as
        ``[B, T, ...]``. Only one chunk's logits exist at a time, in the forward pass and (each
        chunk recomputed under ``jax.checkpoint``) in the backward pass."""
        rows, seq = hidden.shape[:2]
        chunk = max(1, min(seq_chunk, seq))
        n_chunks = -(-seq // chunk)
        pad = n_chunks * chunk - seq

        def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, c, ...]
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            x = x.reshape(rows, n_chunks, chunk, *x.shape[2:])
            return jnp.moveaxis(x, 1, 0)

        @jax.checkpoint
        def one_chunk(xs: Any) -> Any:
            h, *rest = xs
            return fn(self.logits(h), *rest)

        out = jax.lax.map(one_chunk, jax.tree.map(split, (hidden, *per_position)))

        def join(y: jax.Array) -> jax.Array:  # [n, B, c, ...] -> [B, T, ...]
            y = jnp.moveaxis(y, 0, 1).reshape(rows, n_chunks * chunk, *y.shape[3:])
            return y[:, :seq]

        return jax.tree.map(join, out)

    def token_nll(self, hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``transformer.token_nll`` of ``targets`` (``-log p`` and ``logsumexp``, ``[B, T]``
        fp32), computed chunk by chunk (``per_token``)."""
        return self.per_token(token_nll, hidden, targets)

    def target_log_probs(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        targets: jax.Array,
        branch_ids: jax.Array | None = None,
    ) -> jax.Array:
        """``log p(targets)`` per token ``[B, T]``, fp32."""
        nll, _ = self.token_nll(self.hidden(tokens, positions, segment_ids, branch_ids), targets)
        return -nll


class Objective(abc.ABC):
    """Base of every objective (see the module docstring): a subclass defines ``loss``."""

    name: str = "objective"
    loss_unit: str = "nats/token"  # what one unit of ``count`` is, for the loss plot's axis
    has_extra: bool = False  # True: ``init_extra`` gives trainable parameters of its own

    def init_extra(self, config: ModelConfig, key: jax.Array) -> Any:
        """The objective's own trainable parameters (a reward model's heads); most have none."""
        del config, key
        return None

    def batch_axes(self, field: str, rank: int) -> tuple[str | None, ...]:
        return default_batch_axes(field, rank)

    def has_work(self, batch: Any) -> jax.Array:
        """Whether a microbatch adds anything to the loss: the trainer skips those that do not
        (spare rows of a packed batch), which must then contribute exactly zero."""
        return batch.loss_mask.any()

    @abc.abstractmethod
    def loss(self, model: ModelView, extra: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss_sum, sums)`` over one (micro)batch, ``sums["count"]`` the denominator."""


@dataclasses.dataclass(frozen=True)
class TokenCrossEntropy(Objective):
    """Cross-entropy of ``batch.targets`` where ``batch.loss_mask`` is 1 (a ``train.step.Batch``),
    plus ``z_loss * logsumexp^2`` (AFM's auxiliary loss); ``count`` = learned tokens. Where the
    mask is -1, ``unlikelihood * -log(1 - p(target))`` instead (the target made less likely)."""

    z_loss: float = 0.0
    unlikelihood: float = 0.0
    name: str = "next_token"

    def loss(self, model: ModelView, extra: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        del extra
        nll, log_z = model.token_nll(model.hidden(batch.tokens, batch.positions, batch.segment_ids), batch.targets)
        mask = batch.loss_mask.astype(jnp.float32)
        learn, unlearn = (mask > 0).astype(jnp.float32), (mask < 0).astype(jnp.float32)
        ce = (nll * learn).sum()
        z = (jnp.square(log_z) * learn).sum()
        # log(1 - p) = log(-expm1(-nll)); p -> 1 (nll -> 0) is bounded by clamping nll at 1e-6
        ul = -(jnp.log(-jnp.expm1(-jnp.maximum(nll, 1e-6))) * unlearn).sum()
        sums = {"count": learn.sum(), "cross_entropy": ce}
        if self.unlikelihood:
            sums["unlikelihood"] = ul
        return ce + self.z_loss * z + self.unlikelihood * ul, sums


def next_token(config: ModelConfig) -> TokenCrossEntropy:
    """Pre-training: every target of packed rows, with the model size's z-loss (AFM's 1e-6)."""
    return TokenCrossEntropy(z_loss=config.z_loss, name="next_token")


def assistant_sft(unlikelihood: float = 0.0) -> TokenCrossEntropy:
    """SFT: the assistant's tokens only (rows from ``afmkit.data.chat``), no z-loss; tokens marked
    unlikely weighted by ``unlikelihood``."""
    return TokenCrossEntropy(z_loss=0.0, unlikelihood=unlikelihood, name="sft")


# -- distillation ----------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DistillBatch:
    """Packed rows (``train.step.Batch``'s fields, ``targets`` unused by the loss but kept so the
    rows stay ordinary packed rows) with the teacher's next-token distribution at every position:
    ``teacher_ids [B, T, k]`` its k most likely tokens, ``teacher_log_probs [B, T, k]`` their
    log-probabilities under its full softmax, ``teacher_tail_log_prob [B, T]`` the log of the
    probability left to every other token (``teacher_top_k`` makes all three)."""

    tokens: jax.Array
    targets: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    loss_mask: jax.Array
    teacher_ids: jax.Array
    teacher_log_probs: jax.Array
    teacher_tail_log_prob: jax.Array


def _log_tail(logits: jax.Array, ids: jax.Array, log_z: jax.Array) -> jax.Array:
    """``log`` of the softmax mass of every token not in ``ids [..., k]``: the logsumexp of the
    logits with those k masked out (not ``log(1 - sum p_k)``, which cancels catastrophically
    when the top k hold nearly all the mass)."""
    masked = jnp.put_along_axis(logits, ids, -jnp.inf, axis=-1, inplace=False)
    return jax.nn.logsumexp(masked, axis=-1) - log_z


def top_k_distribution(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ids [..., k], log-probs [..., k], tail log-prob [...])`` of ``softmax(logits)``: the k
    most likely tokens and the mass of the rest lumped into one bucket, fp32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    top, ids = jax.lax.top_k(logits, k)
    return ids.astype(jnp.int32), top - log_z[..., None], _log_tail(logits, ids, log_z)


def lumped_kl(
    student_logits: jax.Array, ids: jax.Array, teacher_log_probs: jax.Array, teacher_tail: jax.Array
) -> jax.Array:
    """KL(teacher || student) per position ``[...]`` over k + 1 outcomes: the teacher's top-k
    tokens and "any other token". Both distributions are coarsened the same way, so this is a
    true KL (>= 0, 0 only when the student gives the k tokens and the tail the teacher's
    probabilities) and a lower bound of the full-vocabulary KL (coarsening never adds divergence).
    Lumping, rather than renormalising the top k, keeps the teacher's own probabilities and
    makes the student pay for the mass it puts on tokens the teacher thinks unlikely."""
    logits = student_logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    student_top = jnp.take_along_axis(logits, ids, axis=-1) - log_z[..., None]
    student_tail = _log_tail(logits, ids, log_z)
    p_top, p_tail = jnp.exp(teacher_log_probs), jnp.exp(teacher_tail)
    # A token with p = 0 adds 0 (p log p -> 0); where() keeps 0 * inf out of the sum and its gradient.
    top = jnp.where(p_top > 0, p_top * (teacher_log_probs - student_top), 0.0).sum(-1)
    tail = jnp.where(p_tail > 0, p_tail * (teacher_tail - student_tail), 0.0)
    return top + tail


@dataclasses.dataclass(frozen=True)
class Distillation(Objective):
    """KL(teacher || student) of the next-token distributions (``lumped_kl``) where
    ``batch.loss_mask`` is 1, on a ``DistillBatch``; ``count`` = those positions. The student is
    the model the step trains (e.g. a compressed base + a LoRA adapter); the teacher's top-k
    come with the batch, so the step never holds the teacher's weights."""

    name: str = "distill_kl"

    def loss(self, model: ModelView, extra: Any, batch: DistillBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
        del extra
        hidden = model.hidden(batch.tokens, batch.positions, batch.segment_ids)
        kl = model.per_token(lumped_kl, hidden, batch.teacher_ids, batch.teacher_log_probs, batch.teacher_tail_log_prob)
        mask = batch.loss_mask.astype(jnp.float32)
        total = (kl * mask).sum()
        return total, {"count": mask.sum(), "kl": total}


def teacher_top_k(model: ModelView, rows: dict[str, Any], *, k: int, seq_chunk: int = SEQ_CHUNK) -> dict[str, Any]:
    """The ``DistillBatch`` teacher fields for packed ``rows`` (``tokens``, ``positions``,
    ``segment_ids`` ``[B, T]``) under ``model`` (the teacher; no gradient), chunked like the loss."""
    if not 1 <= k < model.config.vocab_size:
        raise UserError(f"--top-k must be between 1 and {model.config.vocab_size - 1}, got {k}")
    hidden = model.hidden(rows["tokens"], rows["positions"], rows["segment_ids"])
    ids, log_probs, tail = model.per_token(lambda logits: top_k_distribution(logits, k), hidden, seq_chunk=seq_chunk)
    return {"teacher_ids": ids, "teacher_log_probs": log_probs, "teacher_tail_log_prob": tail}


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
    loss_unit: str = "nats/pair"
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

    def has_work(self, batch: PairBatch) -> jax.Array:
        return batch.pair_mask.any()

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
    """Sampled responses packed into rows: ``tokens``/``targets``/``positions`` ``[N, T]``;
    ``segment_ids`` (0: padding) keep a row's prompts apart, and ``branch_ids`` let a prompt's
    responses share it: 0 on the prompt, s on the s-th response of the row (``transformer.forward``);
    ``loss_mask [N, T]`` 1 on response targets; ``old_log_probs [N, T]`` their log-probabilities
    under the policy that sampled them; ``advantages [N, S]`` the s-th response's in slot s - 1.
    (One response per segment: ``branch_ids`` equal to ``segment_ids``.)"""

    tokens: jax.Array
    targets: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    branch_ids: jax.Array
    loss_mask: jax.Array
    old_log_probs: jax.Array
    advantages: jax.Array


def policy_batch_axes(field: str, rank: int) -> tuple[str | None, ...]:
    if field == "advantages":  # [rows, sequence slots]: the slots are not tokens
        return ("batch", None)[:rank]
    return default_batch_axes(field, rank)


@dataclasses.dataclass(frozen=True)
class Policy(Objective):
    """``algo``: ``mdloo`` (mirror descent with a KL trust region of step size ``step_size`` to
    the sampling policy), ``rloo`` (one policy-gradient step) or ``ppo-clip`` (``clip_epsilon``);
    the math is ``posttrain.losses``'."""

    algo: str = "mdloo"
    step_size: float = 1.0
    clip_epsilon: float = 0.2
    anchor_weight: float = 0.0  # times the anchor windows' mean per-token KL to the teacher, per loss unit
    name: str = "policy"

    def __post_init__(self) -> None:
        if self.algo not in POLICY_ALGOS:
            raise UserError(f"unknown policy algorithm {self.algo!r}; choose one of {', '.join(POLICY_ALGOS)}")

    def batch_axes(self, field: str, rank: int) -> tuple[str | None, ...]:
        return policy_batch_axes(field, rank)

    def loss(self, model: ModelView, extra: Any, batch: PolicyBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
        from afmkit.posttrain import losses

        del extra
        logp = model.target_log_probs(batch.tokens, batch.positions, batch.segment_ids, batch.targets, batch.branch_ids)
        seq = {"segment_ids": batch.branch_ids}  # the losses' sequences are the responses
        if self.algo == "mdloo":
            total, metrics = losses.mdloo_loss(
                logp, batch.old_log_probs, batch.loss_mask, batch.advantages, step_size=self.step_size, **seq
            )
        elif self.algo == "rloo":
            total, metrics = losses.rloo_loss(logp, batch.loss_mask, batch.advantages, **seq)
        else:
            total, metrics = losses.ppo_clip_loss(
                logp, batch.old_log_probs, batch.loss_mask, batch.advantages, clip_epsilon=self.clip_epsilon, **seq
            )
        return with_anchor(model, batch, self.anchor_weight, total, metrics)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AnchoredPolicyBatch(PolicyBatch):
    """DPO's pairs or RL's samples (``PolicyBatch``) plus, on every row, a window of plain text with
    the anchor teacher's next-token distribution at each position (``DistillBatch``'s teacher fields, made
    by ``train.teacher.add_teacher``): ``anchor_tokens``/``_positions``/``_segment_ids``/``_mask``
    ``[B, A]``, ``anchor_teacher_ids``/``_log_probs`` ``[B, A, k]``, ``anchor_teacher_tail_log_prob``
    ``[B, A]``. One window per row, so a microbatch of rows carries its share of both."""

    anchor_tokens: jax.Array
    anchor_positions: jax.Array
    anchor_segment_ids: jax.Array
    anchor_mask: jax.Array
    anchor_teacher_ids: jax.Array
    anchor_teacher_log_probs: jax.Array
    anchor_teacher_tail_log_prob: jax.Array


@dataclasses.dataclass(frozen=True)
class Preference(Objective):
    """DPO (``posttrain.losses.dpo_loss``) with strength ``beta`` on a ``PolicyBatch`` of pairs:
    each pair's two responses share one copy of their prompt, preferred first; ``old_log_probs``
    holds the reference policy's per-token log-probabilities and ``advantages`` +1 / -1 (the
    preferred / the other response), or +1 / 0 for a replay chat (an answer alone, its NLL
    weighted by ``replay_weight``).

    With ``anchor_weight`` W > 0 the batch is an ``AnchoredPolicyBatch`` and each pair adds W times
    the mean per-token ``lumped_kl`` (KL(teacher || policy)) over its microbatch's anchor windows:
    plain text on which the policy is held to the teacher (the base), since the pairs say nothing
    about it (DPO runs drifted on generic text: docs/posttraining.md). ``anchor_kl`` reports that
    mean (per pair, so divided by the pairs it is the pair-weighted mean per-token KL)."""

    beta: float = 0.1
    nll_weight: float = 0.0  # times the preferred answer's mean token NLL (RPO)
    replay_weight: float = 0.0  # times a replay chat's mean token NLL
    anchor_weight: float = 0.0  # times the anchor windows' mean per-token KL to the teacher, per pair
    name: str = "dpo"
    loss_unit: str = "nats/pair"

    def batch_axes(self, field: str, rank: int) -> tuple[str | None, ...]:
        return policy_batch_axes(field, rank)

    def loss(self, model: ModelView, extra: Any, batch: PolicyBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
        from afmkit.posttrain import losses

        del extra
        logp = model.target_log_probs(batch.tokens, batch.positions, batch.segment_ids, batch.targets, batch.branch_ids)
        total, metrics = losses.dpo_loss(
            logp,
            batch.old_log_probs,
            batch.loss_mask,
            batch.advantages,
            beta=self.beta,
            segment_ids=batch.branch_ids,
            nll_weight=self.nll_weight,
            replay_weight=self.replay_weight,
        )
        return with_anchor(model, batch, self.anchor_weight, total, metrics)


def with_anchor(
    model: ModelView, batch: PolicyBatch, weight: float, total: jax.Array, metrics: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``total`` plus ``weight`` times the mean per-token ``lumped_kl`` (KL(teacher || policy)) over
    the batch's anchor windows (an ``AnchoredPolicyBatch``) for each of the loss's ``count`` units
    (pairs, samples, tokens); ``anchor_kl`` in the metrics. Unchanged when ``weight`` is 0."""
    if weight == 0:
        return total, metrics
    hidden = model.hidden(batch.anchor_tokens, batch.anchor_positions, batch.anchor_segment_ids)
    kl = model.per_token(
        lumped_kl,
        hidden,
        batch.anchor_teacher_ids,
        batch.anchor_teacher_log_probs,
        batch.anchor_teacher_tail_log_prob,
    )
    mask = batch.anchor_mask.astype(jnp.float32)
    mean_kl = (kl * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    # per unit, like every other term: the step divides the sums by the count
    metrics = {**metrics, "anchor_kl": mean_kl * metrics["count"]}
    return total + weight * metrics["anchor_kl"], metrics
