"""The math of the reward model and of RL (AFM_SPEC section 5), as pure jit-able functions.

Reward model: a soft-label Bradley-Terry loss over (chosen, rejected) pairs with four preference
levels, plus the single-sided grade heads' cross-entropy. RL: the sequence reward
``R = r - beta * log(pi / pi_ref)``, leave-one-out advantages, and three policy objectives on the
same advantages: MDLOO (mirror descent with a KL trust region to the previous iterate), RLOO (one
plain policy-gradient step) and PPO-clip (the ablation baselines). Offline preference pairs:
DPO (Rafailov et al. 2023), on two responses to one prompt, one preferred.

Every objective returns ``(loss_sum, metrics)``: sums, never means, over the batch, with
``metrics["count"]`` the denominator (pairs, sequences or tokens; each function says which).
Summed microbatches therefore add up exactly to the whole batch, as in ``train/step.py``'s
``_loss_sums``; the trainer divides the summed loss, gradients and every metric by the summed
``count``. Masked entries contribute nothing (``jnp.where``, so even a NaN or -inf under the mask
cannot leak into the sum or its gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afmkit.errors import UserError

# Soft labels p(chosen beats rejected) for the four preference levels, indexed by level:
# 0 significantly better, 1 better, 2 slightly better, 3 negligibly better (AFM_SPEC section 5).
PREFERENCE_LEVEL_PROBS = (0.95, 0.85, 0.75, 0.65)
PREFERENCE_LEVEL_NAMES = ("significantly better", "better", "slightly better", "negligibly better")
# Largest |log(pi / pi_k)| of one sequence the RL objectives exponentiate: a numeric guard against
# fp32 overflow (exp(88) is inf), far beyond any ratio a sane trust region lets through (e^20 = 5e8).
MAX_LOG_RATIO = 20.0


# -- reward model -----------------------------------------------------------------------------
def reward_pair_loss(chosen: jax.Array, rejected: jax.Array, level: jax.Array) -> jax.Array:
    """Per-pair soft-label Bradley-Terry loss ``[B]``:
    ``-p log sigmoid(r_c - r_r) - (1 - p) log sigmoid(r_r - r_c)`` with ``p`` the level's soft
    label. ``level`` indexes ``PREFERENCE_LEVEL_PROBS`` (0..3; the data loaders validate it)."""
    p = jnp.asarray(PREFERENCE_LEVEL_PROBS, jnp.float32)[level]
    margin = chosen.astype(jnp.float32) - rejected.astype(jnp.float32)
    return -p * jax.nn.log_sigmoid(margin) - (1.0 - p) * jax.nn.log_sigmoid(-margin)


def grade_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """The grade heads' summed cross-entropy per response ``[B]`` from ``logits [B, H, 3]`` and
    ``labels [B, H]``; ``mask [B, H]`` is 1 where a response has that grade (the label of a
    masked head is ignored, whatever it holds)."""
    logits = logits.astype(jnp.float32)
    safe_labels = jnp.where(mask > 0, labels, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, safe_labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(mask > 0, -picked, 0.0).sum(axis=-1)


def reward_model_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    level: jax.Array,
    grade_logits: jax.Array | None = None,
    grade_labels: jax.Array | None = None,
    grade_mask: jax.Array | None = None,
    *,
    grade_weight: float,
    pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """AFM's reward-model loss ``L_rank + lambda * sum of the grade cross-entropies``, summed.

    ``chosen``, ``rejected``, ``level``: ``[B]`` scores and levels of B pairs; ``pair_mask [B]``
    (1 = real pair) drops padding rows. ``grade_logits [N, H, 3]``, ``grade_labels [N, H]``,
    ``grade_mask [N, H]``: the grade heads of the N responses scored in this batch (typically the
    2B chosen and rejected responses; a response without grades has an all-zero mask).
    ``grade_weight`` is lambda (AFM does not publish it).

    Returns ``loss_sum`` over pairs and metrics (sums): ``count`` (pairs), ``rank_loss``,
    ``grade_loss``, ``pair_accuracy`` (pairs with chosen scored above rejected), ``margin``
    (chosen - rejected) and ``graded`` (head labels present). The mean over pairs of the returned
    loss is the mean per-pair ``L_rank`` plus lambda times the grade cross-entropy per pair.
    """
    if pair_mask is None:
        pair_mask = jnp.ones(chosen.shape, jnp.float32)
    real = pair_mask > 0
    rank = jnp.where(real, reward_pair_loss(chosen, rejected, level), 0.0).sum()
    margin = chosen.astype(jnp.float32) - rejected.astype(jnp.float32)
    if grade_logits is None:
        grades = jnp.zeros((), jnp.float32)
        graded = jnp.zeros((), jnp.float32)
    else:
        if grade_labels is None or grade_mask is None:
            raise ValueError("grade_logits need grade_labels and grade_mask")
        grades = grade_loss(grade_logits, grade_labels, grade_mask).sum()
        graded = (grade_mask > 0).astype(jnp.float32).sum()
    metrics = {
        "count": real.astype(jnp.float32).sum(),
        "rank_loss": rank,
        "grade_loss": grades,
        "graded": graded,
        "pair_accuracy": jnp.where(real & (margin > 0), 1.0, 0.0).sum(),
        "margin": jnp.where(real, margin, 0.0).sum(),
    }
    return rank + grade_weight * grades, metrics


# -- RL: rewards and advantages ---------------------------------------------------------------
def sequence_rewards(reward: jax.Array, logp_policy_seq: jax.Array, logp_ref_seq: jax.Array, beta: float) -> jax.Array:
    """AFM's sequence reward ``R = r - beta * (log pi(y|x) - log pi_ref(y|x))`` ``[N]``; the
    log-probabilities are whole-response sums of per-token ones. Its expectation over
    ``y ~ pi`` is ``E[r] - beta * KL(pi || pi_ref)``: the KL enters with a minus sign."""
    return reward.astype(jnp.float32) - beta * (logp_policy_seq.astype(jnp.float32) - logp_ref_seq.astype(jnp.float32))


def leave_one_out_advantages(rewards: jax.Array) -> jax.Array:
    """``A_i = R_i - mean_{j != i} R_j`` within each prompt's K samples, ``rewards [P, K]`` ->
    ``[P, K]``. Needs K >= 2 (a single sample has no others to compare with)."""
    if rewards.ndim != 2:
        raise UserError(f"leave-one-out advantages need rewards shaped [prompts, K]; got shape {rewards.shape}")
    k = rewards.shape[1]
    if k < 2:
        raise UserError(f"leave-one-out advantages need K >= 2 samples per prompt; got K={k}: pass --k 2 or more")
    rewards = rewards.astype(jnp.float32)
    others_mean = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    return rewards - others_mean


# -- RL: policy objectives --------------------------------------------------------------------
def _sequences(
    mask: jax.Array, advantages: jax.Array, segment_ids: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each row's sequences are: ``(slots [N, T, S], advantages [N, S], has_tokens [N, S])``.

    Unpacked rows (``segment_ids`` None, ``advantages [N]``) hold one sequence each. Packed rows
    (RL packs several prompt + response sequences into one row) hold up to S, told apart by
    ``segment_ids`` 1..S (0: padding), with ``advantages [N, S]`` per sequence slot."""
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    if segment_ids is None:
        segment_ids = jnp.ones(mask.shape, jnp.int32)
    slots = segment_ids[..., None] == jnp.arange(1, advantages.shape[1] + 1, dtype=segment_ids.dtype)
    slots = slots & (mask > 0)[..., None]
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    return slots, advantages, slots.any(axis=1)


def _per_sequence(per_token: jax.Array, slots: jax.Array) -> jax.Array:
    """The sum of ``per_token [N, T]`` over each sequence's response tokens: ``[N, S]``."""
    return jnp.where(slots, per_token.astype(jnp.float32)[..., None], 0.0).sum(axis=1)


def _sequence_log_ratio(logp_new_tok: jax.Array, logp_old_tok: jax.Array, slots: jax.Array) -> jax.Array:
    """``log(pi(y|x) / pi_k(y|x))`` per sequence ``[N, S]``, the whole response being one action."""
    diff = logp_new_tok.astype(jnp.float32) - logp_old_tok.astype(jnp.float32)
    return jnp.clip(_per_sequence(diff, slots), -MAX_LOG_RATIO, MAX_LOG_RATIO)


def mdloo_loss(
    logp_new_tok: jax.Array,
    logp_old_tok: jax.Array,
    mask: jax.Array,
    advantages: jax.Array,
    *,
    step_size: float,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MDLOO: minus the mirror-descent objective ``E_{y~pi_k}[(pi/pi_k) A] - (1/t_k) KL(pi || pi_k)``,
    summed over the N sampled sequences (``count`` = sequences with at least one response token).

    ``logp_new_tok [N, T]``: per-token log-probabilities of the sampled responses under the policy
    being optimised (differentiated); ``logp_old_tok [N, T]``: the same under ``pi_k``, the
    policy that sampled them (constants); ``mask [N, T]``: 1 on response tokens; ``advantages
    [N]``: leave-one-out advantages (constants); ``step_size``: t_k. Packed rows: ``segment_ids
    [N, T]`` and ``advantages [N, S]`` (``_sequences``); every sum is then per sequence.

    The ratio is per sequence, ``rho = pi(y|x) / pi_k(y|x) = exp(sum_t mask * (logp_new - logp_old))``.
    KL estimator: with samples from ``pi_k`` only, ``KL(pi || pi_k) = E_{y~pi}[log rho]
    = E_{y~pi_k}[rho log rho]``; adding ``1 - rho`` (mean zero under ``pi_k``, as
    ``E_{pi_k}[rho] = 1``) gives ``E_{y~pi_k}[rho log rho - rho + 1]``: unbiased, >= 0 for every
    sample (``x log x - x + 1 >= 0``), 0 with zero gradient when ``pi = pi_k``, so each
    iteration's first step is exactly the RLOO policy gradient. Sign: the objective subtracts the
    KL, so the loss (its negative) adds ``(1/t_k) * (rho log rho - rho + 1)``.
    """
    if isinstance(step_size, (int, float)) and step_size <= 0:
        raise UserError(f"the mirror-descent step size t_k must be positive; got {step_size}")
    slots, advantages, has_tokens = _sequences(mask, advantages, segment_ids)
    logp_old_tok = jax.lax.stop_gradient(logp_old_tok)
    log_ratio = _sequence_log_ratio(logp_new_tok, logp_old_tok, slots)
    ratio = jnp.exp(log_ratio)
    kl = ratio * log_ratio - ratio + 1.0
    per_sequence = -ratio * advantages + kl / step_size
    metrics = {
        "count": has_tokens.astype(jnp.float32).sum(),
        "kl_to_previous": jnp.where(has_tokens, kl, 0.0).sum(),
        "ratio": jnp.where(has_tokens, ratio, 0.0).sum(),
        "advantage": jnp.where(has_tokens, advantages, 0.0).sum(),
        "tokens": slots.astype(jnp.float32).sum(),
    }
    return jnp.where(has_tokens, per_sequence, 0.0).sum(), metrics


def rloo_loss(
    logp_new_tok: jax.Array, mask: jax.Array, advantages: jax.Array, *, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RLOO: one plain policy-gradient (REINFORCE) step with the leave-one-out advantage,
    ``-A * log pi(y|x)`` summed over sequences (``count`` = sequences with response tokens). Its
    gradient, ``-A grad log pi(y|x)``, equals MDLOO's at ``pi = pi_k``. Packed rows as in
    ``mdloo_loss``."""
    slots, advantages, has_tokens = _sequences(mask, advantages, segment_ids)
    logp_seq = _per_sequence(logp_new_tok, slots)
    metrics = {
        "count": has_tokens.astype(jnp.float32).sum(),
        "advantage": jnp.where(has_tokens, advantages, 0.0).sum(),
        "tokens": slots.astype(jnp.float32).sum(),
    }
    return jnp.where(has_tokens, -advantages * logp_seq, 0.0).sum(), metrics


def ppo_clip_loss(
    logp_new_tok: jax.Array,
    logp_old_tok: jax.Array,
    mask: jax.Array,
    advantages: jax.Array,
    *,
    clip_epsilon: float = 0.2,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate with a per-token ratio ``rho_t = pi(y_t|.)/pi_k(y_t|.)`` and the
    sequence's advantage on each of its tokens (no critic):
    ``-min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A)`` summed over response tokens (``count`` =
    tokens, so the trainer's division gives the token mean, as in PPO and TRL). Packed rows as in
    ``mdloo_loss``."""
    slots, advantages, _ = _sequences(mask, advantages, segment_ids)
    advantages = jnp.where(slots, advantages[:, None, :], 0.0).sum(axis=-1)  # each token its sequence's
    logp_old_tok = jax.lax.stop_gradient(logp_old_tok)
    valid = slots.any(axis=-1)
    log_ratio = jnp.where(valid, logp_new_tok.astype(jnp.float32) - logp_old_tok.astype(jnp.float32), 0.0)
    ratio = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
    per_token = -jnp.minimum(unclipped, clipped)
    metrics = {
        "count": valid.astype(jnp.float32).sum(),
        "clip_fraction": jnp.where(valid & (clipped < unclipped), 1.0, 0.0).sum(),
        "ratio": jnp.where(valid, ratio, 0.0).sum(),
        "tokens": valid.astype(jnp.float32).sum(),
    }
    return jnp.where(valid, per_token, 0.0).sum(), metrics


# -- offline preference pairs ----------------------------------------------------------------
def dpo_loss(
    logp_new_tok: jax.Array,
    logp_ref_tok: jax.Array,
    mask: jax.Array,
    preference: jax.Array,
    *,
    beta: float,
    segment_ids: jax.Array,
    nll_weight: float = 0.0,
    replay_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO: ``-log sigmoid(beta * (log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)))`` summed
    over pairs (``count`` = pairs). Packed rows as in ``mdloo_loss``; a pair is the two
    sequence slots ``2j`` and ``2j + 1`` of a row, ``preference [N, S]`` +1 on the preferred
    response's slot, -1 on the other's, 0 on empty slots. ``logp_ref_tok``: the reference
    policy's per-token log-probabilities (constants). The implicit reward of a response is
    ``beta * log(pi / pi_ref)``: the loss raises the preferred one's over the other's, and the
    reference keeps both where they were in everything the pair does not tell apart.

    ``nll_weight`` adds that times the preferred answer's mean token negative log-likelihood
    per pair (RPO, Pang et al. 2024): DPO alone can lower both answers' likelihood as long as
    the other's falls faster, and the preferred answer is the text the model should write.

    A replay chat is a slot pair marked ``(+1, 0)``: an answer with no other to compare (the
    second slot empty). ``replay_weight`` adds that times its mean token NLL, which holds the
    model on text the pairs are not about (the reference's own answers, say). It is not a pair:
    ``count`` and the pair metrics leave it out, so the replay sum is divided by the step's pairs."""
    if isinstance(beta, (int, float)) and beta <= 0:
        raise UserError(f"the DPO beta must be positive; got {beta}")
    if preference.shape[-1] % 2:
        raise UserError(f"preference pairs take an even number of sequence slots; got {preference.shape[-1]}")
    slots, sign, _ = _sequences(mask, preference, segment_ids)
    logp_ref_tok = jax.lax.stop_gradient(logp_ref_tok)
    log_ratio = _per_sequence(logp_new_tok.astype(jnp.float32) - logp_ref_tok.astype(jnp.float32), slots)
    paired = (*sign.shape[:-1], -1, 2)  # [N, S / 2, the pair's two slots]
    margin = beta * (sign * log_ratio).reshape(paired).sum(axis=-1)
    is_pair = (sign != 0).reshape(paired).all(axis=-1)
    chosen = beta * jnp.where(sign > 0, log_ratio, 0.0).reshape(paired).sum(axis=-1)
    preferred = slots & (sign > 0)[:, None, :]  # [N, T, S]: the preferred (or replayed) answers' tokens
    tokens = preferred.sum(axis=1).reshape(paired).sum(axis=-1)
    nll = -_per_sequence(logp_new_tok, preferred).reshape(paired).sum(axis=-1) / jnp.maximum(tokens, 1)
    is_replay = (sign.reshape(paired)[..., 0] > 0) & (sign.reshape(paired)[..., 1] == 0) & (tokens > 0)
    metrics = {
        "count": is_pair.astype(jnp.float32).sum(),
        "accuracy": jnp.where(is_pair & (margin > 0), 1.0, 0.0).sum(),
        "margin": jnp.where(is_pair, margin, 0.0).sum(),
        "chosen_reward": jnp.where(is_pair, chosen, 0.0).sum(),
        "rejected_reward": jnp.where(is_pair, chosen - margin, 0.0).sum(),
        "preferred_nll": jnp.where(is_pair, nll, 0.0).sum(),
    }
    total = jnp.where(is_pair, jax.nn.softplus(-margin) + nll_weight * nll, 0.0).sum()
    if isinstance(replay_weight, (int, float)) and replay_weight == 0:
        return total, metrics  # no replay term: no replay entries in the metrics either
    metrics["replay_nll"] = jnp.where(is_replay, nll, 0.0).sum()
    metrics["replay_chats"] = is_replay.astype(jnp.float32).sum()
    # drift on the replayed text: mean token log(pi / pi_ref), 0 while the model is the reference
    metrics["replay_log_ratio"] = jnp.where(is_replay, chosen / (beta * jnp.maximum(tokens, 1)), 0.0).sum()
    return total + replay_weight * metrics["replay_nll"], metrics
