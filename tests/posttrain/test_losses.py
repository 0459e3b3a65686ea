"""The reward-model and RL losses against numpy transcriptions of AFM_SPEC section 5 / issue 12.

The references below are written from the formulas in float64, independently of
``afmkit.posttrain.losses``. The losses run in fp32: each value is a handful of fp32 operations
(one exp/log per sequence, sums of <= 12 terms), so relative errors stay within ~10 ulps
(1.2e-6); RTOL = 1e-5 leaves a tenfold margin and still catches any wrong sign or factor.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.errors import UserError
from afmkit.posttrain import losses

RTOL, ATOL = 1e-5, 1e-6


# -- numpy transcriptions ---------------------------------------------------------------------
def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_pair_loss(chosen, rejected, level):
    p = np.array([0.95, 0.85, 0.75, 0.65])[level]
    d = chosen - rejected
    return -p * np_log_sigmoid(d) - (1 - p) * np_log_sigmoid(-d)


def np_grade_loss(logits, labels, mask):
    out = np.zeros(logits.shape[0])
    for b in range(logits.shape[0]):
        for h in range(logits.shape[1]):
            if mask[b, h]:
                z = logits[b, h]
                out[b] += np.log(np.exp(z).sum()) - z[labels[b, h]]
    return out


def np_loo(rewards):
    p, k = rewards.shape
    out = np.zeros_like(rewards)
    for a in range(p):
        for i in range(k):
            out[a, i] = rewards[a, i] - np.mean([rewards[a, j] for j in range(k) if j != i])
    return out


def np_mdloo(new, old, mask, adv, t):
    """Per-sequence -( rho A - (1/t) KLhat ), KLhat = rho log rho - rho + 1, rho = pi/pi_k."""
    log_rho = ((new - old) * mask).sum(-1)
    rho = np.exp(log_rho)
    return -(rho * adv - (rho * log_rho - rho + 1) / t)


def np_mdloo_grad(new, old, mask, adv, t):
    """d(per-sequence loss)/d new[n, t] = mask * rho * (-A + (1/t) log rho), by the chain rule
    through log rho = sum_t mask (new - old)."""
    log_rho = ((new - old) * mask).sum(-1)
    rho = np.exp(log_rho)
    return mask * (rho * (-adv + log_rho / t))[:, None]


def np_ppo(new, old, mask, adv, eps):
    rho = np.exp(new - old)
    a = adv[:, None]
    return (-np.minimum(rho * a, np.clip(rho, 1 - eps, 1 + eps) * a) * mask).sum()


def finite_difference(f, x, h=1e-6):
    """Central differences in float64: truncation O(h^2) ~ 1e-12, round-off ~ 1e-16 / h = 1e-10."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (f(up) - f(down)) / (2 * h)
    return grad


@pytest.fixture
def rl_batch():
    """Two prompts x K=3 samples, 5 token slots each, ragged masks (one sequence empty)."""
    rng = np.random.default_rng(0)
    old = -rng.uniform(0.1, 3.0, size=(6, 5))
    new = old + rng.normal(0.0, 0.15, size=(6, 5))
    mask = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0],
        ],
        dtype=np.float64,
    )
    rewards = np.array([[0.0, 1.0, 0.5], [0.2, 0.9, 0.3]])
    adv = np_loo(rewards).reshape(-1)
    return new, old, mask, adv


def f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


# -- reward model -----------------------------------------------------------------------------
def test_reward_pair_loss_matches_soft_label_bradley_terry():
    chosen = np.array([2.0, 0.3, -1.0, 0.0, 5.0, -3.0, 0.7, 0.1])
    rejected = np.array([-1.0, 0.5, -1.0, 2.0, -5.0, 1.0, 0.2, 0.1])
    level = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    got = losses.reward_pair_loss(*f32(chosen, rejected), jnp.asarray(level))
    np.testing.assert_allclose(got, np_pair_loss(chosen, rejected, level), rtol=RTOL, atol=ATOL)
    # d/d(chosen) = sigmoid(margin) - p: with soft labels the loss stops pulling once the model
    # is as sure as the label (margin = logit(p)), and pushes back beyond it.
    grad = jax.grad(lambda c: losses.reward_pair_loss(c, *f32(rejected), jnp.asarray(level)).sum())(
        jnp.asarray(chosen, jnp.float32)
    )
    p = np.array(losses.PREFERENCE_LEVEL_PROBS)[level]
    np.testing.assert_allclose(grad, 1 / (1 + np.exp(-(chosen - rejected))) - p, rtol=RTOL, atol=ATOL)
    at_label = np.log(p / (1 - p))
    grad_at_label = jax.grad(lambda c: losses.reward_pair_loss(c, jnp.zeros(8), jnp.asarray(level)).sum())(
        jnp.asarray(at_label, jnp.float32)
    )
    np.testing.assert_allclose(grad_at_label, 0.0, atol=ATOL)


def test_grade_loss_ignores_masked_heads_whatever_they_hold():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 3)) * 2
    labels = rng.integers(0, 3, size=(3, 4))
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    got = losses.grade_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask))
    np.testing.assert_allclose(got, np_grade_loss(logits, labels, mask), rtol=RTOL, atol=ATOL)
    assert got[2] == 0.0
    garbage_labels = np.where(mask > 0, labels, -7)
    garbage_logits = np.where(mask[..., None] > 0, logits, np.nan)
    again = losses.grade_loss(jnp.asarray(garbage_logits, jnp.float32), jnp.asarray(garbage_labels), jnp.asarray(mask))
    np.testing.assert_allclose(again, got, rtol=0, atol=0)


def test_reward_model_loss_adds_lambda_times_grades_and_splits_into_microbatches():
    rng = np.random.default_rng(2)
    chosen, rejected = rng.normal(size=4), rng.normal(size=4)
    chosen[1] = rejected[1] + 1.0
    chosen[2] = rejected[2] - 1.0
    level = np.array([0, 1, 2, 3])
    pair_mask = np.array([1, 1, 1, 0])  # the last row is padding
    logits = rng.normal(size=(8, 4, 3))
    labels = rng.integers(0, 3, size=(8, 4))
    grade_mask = (rng.uniform(size=(8, 4)) < 0.5).astype(np.int32)
    lam = 0.3
    total, metrics = jax.jit(lambda *a: losses.reward_model_loss(*a[:-1], grade_weight=lam, pair_mask=a[-1]))(
        *f32(chosen, rejected),
        jnp.asarray(level),
        *f32(logits),
        jnp.asarray(labels),
        jnp.asarray(grade_mask),
        jnp.asarray(pair_mask, jnp.float32),
    )
    rank = np_pair_loss(chosen, rejected, level)[:3].sum()
    grades = np_grade_loss(logits, labels, grade_mask).sum()
    np.testing.assert_allclose(total, rank + lam * grades, rtol=RTOL)
    np.testing.assert_allclose(metrics["rank_loss"], rank, rtol=RTOL)
    assert metrics["count"] == 3
    assert metrics["pair_accuracy"] == ((chosen - rejected)[:3] > 0).sum()
    # Two microbatches (pairs 0-1 with their 4 responses, pairs 2-3 with theirs) add to the whole.
    halves = [
        losses.reward_model_loss(
            *f32(chosen[s], rejected[s]),
            jnp.asarray(level[s]),
            *f32(logits[r]),
            jnp.asarray(labels[r]),
            jnp.asarray(grade_mask[r]),
            grade_weight=lam,
            pair_mask=jnp.asarray(pair_mask[s]),
        )
        for s, r in ((slice(0, 2), slice(0, 4)), (slice(2, 4), slice(4, 8)))
    ]
    np.testing.assert_allclose(halves[0][0] + halves[1][0], total, rtol=RTOL)
    for name, value in metrics.items():
        np.testing.assert_allclose(halves[0][1][name] + halves[1][1][name], value, rtol=RTOL, atol=ATOL)
    without, _ = losses.reward_model_loss(*f32(chosen, rejected), jnp.asarray(level), grade_weight=lam)
    np.testing.assert_allclose(without, np_pair_loss(chosen, rejected, level).sum(), rtol=RTOL)


# -- RL: rewards and advantages ---------------------------------------------------------------
def test_sequence_reward_subtracts_beta_times_the_log_ratio_to_the_reference():
    r = np.array([1.0, 0.5, 0.0])
    policy = np.array([-10.0, -4.0, -20.0])
    ref = np.array([-12.0, -4.0, -15.0])
    got = losses.sequence_rewards(*f32(r, policy, ref), 0.1)
    np.testing.assert_allclose(got, r - 0.1 * (policy - ref), rtol=RTOL)
    # More likely under the policy than under the reference: the KL penalty lowers the reward.
    assert got[0] < r[0] and got[1] == r[1] and got[2] > r[2]


def test_leave_one_out_advantages_match_the_explicit_mean_over_the_others():
    rewards = np.array([[1.0, 2.0, 4.0, 0.5], [0.0, 0.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    got = losses.leave_one_out_advantages(jnp.asarray(rewards, jnp.float32))
    np.testing.assert_allclose(got, np_loo(rewards), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(got).sum(axis=1), 0.0, atol=ATOL)  # a baseline, not a reward shift
    assert (np.asarray(got)[2] == 0).all()


def test_one_sample_per_prompt_is_a_one_line_error():
    with pytest.raises(UserError, match="K >= 2") as error:
        losses.leave_one_out_advantages(jnp.ones((5, 1)))
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="prompts, K"):
        losses.leave_one_out_advantages(jnp.ones((6,)))


# -- RL: policy objectives --------------------------------------------------------------------
def test_mdloo_loss_and_gradient_match_the_mirror_descent_objective(rl_batch):
    new, old, mask, adv = rl_batch
    t = 0.5
    fn = jax.jit(lambda n, o, m, a: losses.mdloo_loss(n, o, m, a, step_size=t))
    (total, metrics), grad = jax.value_and_grad(fn, has_aux=True)(*f32(new, old, mask, adv))
    has_tokens = mask.any(-1)
    reference = np_mdloo(new, old, mask, adv, t)[has_tokens].sum()
    np.testing.assert_allclose(total, reference, rtol=RTOL)
    assert metrics["count"] == 5 and metrics["tokens"] == mask.sum()
    np.testing.assert_allclose(grad, np_mdloo_grad(new, old, mask, adv, t), rtol=1e-4, atol=1e-6)
    # The analytic reference gradient is itself checked against finite differences.
    fd = finite_difference(lambda n: np_mdloo(n, old, mask, adv, t)[has_tokens].sum(), new)
    np.testing.assert_allclose(np_mdloo_grad(new, old, mask, adv, t), fd, atol=1e-7)


def test_mdloo_kl_estimate_is_unbiased_nonnegative_and_penalised():
    """Exact expectation over all outcomes of a 4-outcome policy: sum_y pi_k(y) KLhat(y) equals
    KL(pi || pi_k) = sum_y pi(y) log(pi(y)/pi_k(y)) (not the reverse KL(pi_k || pi))."""
    pi = np.array([0.5, 0.3, 0.15, 0.05])
    pi_k = np.array([0.25, 0.25, 0.25, 0.25])
    per_outcome = []
    for y in range(4):  # one sequence of one token per outcome, zero advantage: loss = KLhat / t
        value, metrics = losses.mdloo_loss(
            *f32(np.log(pi[[y]])[:, None], np.log(pi_k[[y]])[:, None], [[1.0]], [0.0]), step_size=1.0
        )
        np.testing.assert_allclose(value, metrics["kl_to_previous"], rtol=RTOL)
        per_outcome.append(float(value))
    assert min(per_outcome) >= 0.0  # every sample's estimate, not just the mean
    forward_kl = (pi * np.log(pi / pi_k)).sum()
    np.testing.assert_allclose(np.dot(pi_k, per_outcome), forward_kl, rtol=RTOL)
    assert abs(forward_kl - (pi_k * np.log(pi_k / pi)).sum()) > 0.05  # the two KLs differ here
    # A larger trust region (t_k) weakens the penalty: the loss falls as t_k grows when pi != pi_k.
    args = f32(np.log(pi)[:, None], np.log(pi_k)[:, None], np.ones((4, 1)), np.zeros(4))
    tight, loose = (losses.mdloo_loss(*args, step_size=s)[0] for s in (0.1, 10.0))
    assert tight > loose > 0


def test_mdloo_first_step_is_the_rloo_policy_gradient(rl_batch):
    """At pi = pi_k the KL estimate has zero gradient per sample, so MDLOO's first gradient step
    is RLOO's: -A * grad log pi(y|x)."""
    new, _, mask, adv = rl_batch
    md = jax.grad(lambda n: losses.mdloo_loss(n, jax.lax.stop_gradient(n), *f32(mask, adv), step_size=0.01)[0])
    rl = jax.grad(lambda n: losses.rloo_loss(n, *f32(mask, adv))[0])
    expected = -mask * adv[:, None]
    np.testing.assert_allclose(md(jnp.asarray(new, jnp.float32)), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rl(jnp.asarray(new, jnp.float32)), expected, rtol=RTOL, atol=ATOL)
    value, metrics = losses.rloo_loss(*f32(new, mask, adv))
    np.testing.assert_allclose(value, (-adv * (new * mask).sum(-1)).sum(), rtol=RTOL)
    assert metrics["count"] == 5


def test_ppo_clip_is_per_token_and_stops_the_gradient_outside_the_clip_range():
    old = np.log(np.full((2, 4), 0.5))
    # Per-token ratios: inside the range, above 1 + eps, below 1 - eps, and a masked token.
    ratios = np.array([[1.1, 1.5, 0.5, 3.0], [0.9, 1.5, 0.5, 1.0]])
    new = old + np.log(ratios)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float64)
    adv = np.array([2.0, -1.0])
    eps = 0.2
    fn = lambda n: losses.ppo_clip_loss(n, *f32(old, mask, adv), clip_epsilon=eps)  # noqa: E731
    (total, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(new, jnp.float32))
    np.testing.assert_allclose(total, np_ppo(new, old, mask, adv, eps), rtol=RTOL)
    assert metrics["count"] == 7  # tokens: the trainer's division gives PPO's token mean
    # d/d log pi_t of -rho_t A is -rho_t A where the unclipped term is the minimum, else 0:
    # A > 0 clips ratios above 1 + eps (token 1), A < 0 clips those below 1 - eps (token 2).
    expected = np.array([[-1.1 * 2, 0.0, -0.5 * 2, 0.0], [0.9, 1.5, 0.0, 1.0]])
    np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL)
    assert metrics["clip_fraction"] == 2
    fd = finite_difference(lambda n: np_ppo(n, old, mask, adv, eps), new)
    np.testing.assert_allclose(fd, expected, atol=1e-6)


def test_masked_tokens_contribute_nothing_even_when_they_hold_nan(rl_batch):
    new, old, mask, adv = rl_batch
    dirty_new = np.where(mask > 0, new, np.nan)
    dirty_old = np.where(mask > 0, old, -np.inf)
    objectives = {
        "mdloo": lambda n, o: losses.mdloo_loss(n, o, *f32(mask, adv), step_size=0.5),
        "rloo": lambda n, o: losses.rloo_loss(n, *f32(mask, adv)),
        "ppo": lambda n, o: losses.ppo_clip_loss(n, o, *f32(mask, adv)),
    }
    for name, fn in objectives.items():
        (clean, _), clean_grad = jax.value_and_grad(fn, has_aux=True)(*f32(new, old))
        (dirty, _), dirty_grad = jax.value_and_grad(fn, has_aux=True)(*f32(dirty_new, dirty_old))
        np.testing.assert_allclose(dirty, clean, rtol=0, atol=0, err_msg=name)
        np.testing.assert_allclose(dirty_grad, clean_grad, rtol=0, atol=0, err_msg=name)
        assert (np.asarray(clean_grad)[mask == 0] == 0).all(), name


def test_rl_losses_split_into_microbatches_exactly(rl_batch):
    new, old, mask, adv = rl_batch
    objectives = {
        "mdloo": lambda s: losses.mdloo_loss(*f32(new[s], old[s], mask[s], adv[s]), step_size=0.5),
        "rloo": lambda s: losses.rloo_loss(*f32(new[s], mask[s], adv[s])),
        "ppo": lambda s: losses.ppo_clip_loss(*f32(new[s], old[s], mask[s], adv[s])),
    }
    for name, fn in objectives.items():
        whole, whole_metrics = fn(slice(None))
        first, first_metrics = fn(slice(0, 3))
        second, second_metrics = fn(slice(3, 6))
        np.testing.assert_allclose(first + second, whole, rtol=RTOL, atol=ATOL, err_msg=name)
        for key, value in whole_metrics.items():
            np.testing.assert_allclose(first_metrics[key] + second_metrics[key], value, rtol=RTOL, atol=ATOL)


def test_packed_rows_give_each_sequence_the_loss_and_gradient_it_has_alone(rl_batch):
    """RL packs several sequences into one row (segment ids 1..S, advantages per slot): every
    objective's loss, metrics and per-token gradient equal those of one sequence per row."""
    new, old, mask, adv = rl_batch
    # Rows of 15 tokens: sequences (0, 1, 2), (3, 4) and (5,); a padding token (segment 0) ends row 1.
    layout = [(0, 1, 2), (3, 4), (5,)]
    width = 15
    packed = {name: np.zeros((3, width)) for name in ("new", "old", "mask", "segments")}
    packed_adv = np.zeros((3, 4))  # one spare slot
    where = {}
    for row, members in enumerate(layout):
        for slot, i in enumerate(members):
            span = slice(5 * slot, 5 * slot + 5)
            packed["new"][row, span], packed["old"][row, span], packed["mask"][row, span] = new[i], old[i], mask[i]
            packed["segments"][row, span] = slot + 1
            packed_adv[row, slot] = adv[i]
            where[i] = (row, span)
    packed["mask"][1, 10:] = 1.0  # under segment 0: padding, whatever its mask says
    segments = jnp.asarray(packed["segments"], jnp.int32)
    objectives = {
        "mdloo": lambda n, o, m, a, **s: losses.mdloo_loss(n, o, m, a, step_size=0.5, **s),
        "rloo": lambda n, o, m, a, **s: losses.rloo_loss(n, m, a, **s),
        "ppo": lambda n, o, m, a, **s: losses.ppo_clip_loss(n, o, m, a, **s),
    }
    for name, fn in objectives.items():
        (alone, alone_metrics), alone_grad = jax.value_and_grad(fn, has_aux=True)(*f32(new, old, mask, adv))
        (together, metrics), grad = jax.value_and_grad(fn, has_aux=True)(
            *f32(packed["new"], packed["old"], packed["mask"], packed_adv), segment_ids=segments
        )
        np.testing.assert_allclose(together, alone, rtol=RTOL, err_msg=name)
        for key, value in alone_metrics.items():
            np.testing.assert_allclose(metrics[key], value, rtol=RTOL, err_msg=f"{name} {key}")
        for i, (row, span) in where.items():
            np.testing.assert_allclose(grad[row, span], alone_grad[i], rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_array_equal(grad[1, 10:], 0.0)
