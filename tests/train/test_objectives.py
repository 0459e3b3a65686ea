"""The one trainer with every objective and both trainable subsets: sharded equals unsharded
(8 simulated devices, mesh data=2,fsdp=2,tensor=2), gradients reach only the trainable subset
(the frozen base is bit-for-bit unchanged), and accumulating microbatches equals the full batch
for an objective whose count is pairs, not tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.adapters.lora import LoraConfig
from afmkit.config import get_size
from afmkit.model.transformer import init_params
from afmkit.sharding.mesh import make_mesh
from afmkit.train.objectives import (
    PairBatch,
    Policy,
    PolicyBatch,
    Preference,
    RewardModel,
    assistant_sft,
    next_token,
)
from afmkit.train.optim import OptimizerConfig, build_optimizer, lr_schedule
from afmkit.train.step import (
    Batch,
    StepConfig,
    global_batch,
    init_sharded_state,
    init_state,
    make_train_step,
    state_shardings,
    train_step_fn,
)
from afmkit.train.trainable import FULL, LoraWeights

CONFIG = get_size("test-tiny")
ROWS, SEQ, STEPS = 8, 16, 3
MESH = "data=2,fsdp=2,tensor=2"
BASE = init_params(CONFIG, jax.random.PRNGKey(1))
LORA = LoraWeights(LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down")))


def token_batches(rng, *, assistant_only):
    batches = []
    for _ in range(STEPS):
        tokens = rng.integers(0, CONFIG.vocab_size, (ROWS, SEQ + 1), dtype=np.int32)
        segments = np.where(np.arange(SEQ + 1) < SEQ // 2, 1, 2).astype(np.int32) * np.ones((ROWS, 1), np.int32)
        positions = np.where(segments == 1, np.arange(SEQ + 1), np.arange(SEQ + 1) - SEQ // 2).astype(np.int32)
        mask = (segments[:, 1:] == segments[:, :-1]).astype(np.float32)
        if assistant_only:  # SFT: a random subset of targets are the assistant's
            mask *= rng.random((ROWS, SEQ)) < 0.4
        batches.append(
            Batch(
                tokens=tokens[:, :-1],
                targets=tokens[:, 1:],
                positions=positions[:, :-1],
                segment_ids=segments[:, :-1],
                loss_mask=mask,
            )
        )
    return batches


def pair_batches(rng):
    batches = []
    for _ in range(STEPS):
        grades = rng.integers(0, 3, (ROWS, 4)).astype(np.int32)
        batches.append(
            PairBatch(
                chosen_tokens=rng.integers(0, CONFIG.vocab_size, (ROWS, SEQ), dtype=np.int32),
                chosen_lengths=rng.integers(3, SEQ + 1, ROWS).astype(np.int32),
                rejected_tokens=rng.integers(0, CONFIG.vocab_size, (ROWS, SEQ), dtype=np.int32),
                rejected_lengths=rng.integers(3, SEQ + 1, ROWS).astype(np.int32),
                level=rng.integers(0, 4, ROWS).astype(np.int32),
                pair_mask=(np.arange(ROWS) < ROWS - 1).astype(np.float32),  # one padding pair
                chosen_grades=grades,
                chosen_grade_mask=(rng.random((ROWS, 4)) < 0.5).astype(np.float32),
                rejected_grades=grades[::-1].copy(),
                rejected_grade_mask=(rng.random((ROWS, 4)) < 0.5).astype(np.float32),
            )
        )
    return batches


def policy_batches(rng):
    """Two sampled sequences packed per row (segments 1 and 2), as ``posttrain.rl`` packs them."""
    batches = []
    half = SEQ // 2
    for _ in range(STEPS):
        tokens = rng.integers(0, CONFIG.vocab_size, (ROWS, SEQ + 1), dtype=np.int32)
        within = np.arange(SEQ) % half
        response = (within >= 3) & (within < rng.integers(4, half + 1, (ROWS, 1)))
        batches.append(
            PolicyBatch(
                tokens=tokens[:, :-1],
                targets=tokens[:, 1:],
                positions=np.tile(within.astype(np.int32), (ROWS, 1)),
                segment_ids=np.tile(np.where(np.arange(SEQ) < half, 1, 2).astype(np.int32), (ROWS, 1)),
                branch_ids=np.tile(np.where(np.arange(SEQ) < half, 1, 2).astype(np.int32), (ROWS, 1)),
                loss_mask=response.astype(np.float32),
                # near a random model's own log-probabilities (uniform over the vocabulary), so the
                # sequence ratios stay near 1 as they do in a real iteration
                old_log_probs=(-np.log(CONFIG.vocab_size) + 0.05 * rng.standard_normal((ROWS, SEQ))).astype(np.float32),
                advantages=rng.standard_normal((ROWS, 2)).astype(np.float32),
            )
        )
    return batches


def preference_batches(rng):
    """``policy_batches`` read as preference pairs: each row's two sequences are one pair, the
    preferred one in either slot (+1), the other -1."""
    batches = policy_batches(rng)
    for b in batches:
        first = rng.random((ROWS, 1)) < 0.5
        b.advantages = np.where(first, [[1.0, -1.0]], [[-1.0, 1.0]]).astype(np.float32)
    return batches


OBJECTIVES = {
    "next_token": (next_token(CONFIG), lambda rng: token_batches(rng, assistant_only=False)),
    "sft": (assistant_sft(), lambda rng: token_batches(rng, assistant_only=True)),
    "reward_model": (RewardModel(grade_weight=0.5), pair_batches),
    "mdloo": (Policy(algo="mdloo", step_size=0.5), policy_batches),
    "ppo_clip": (Policy(algo="ppo-clip"), policy_batches),
    "dpo": (Preference(beta=0.1, nll_weight=0.5), preference_batches),
}
SUBSETS = {"full": FULL, "lora": LORA}


def optimizer_config():
    # Adam's first update is g / (|g| + eps): with eps = 1e-8 a gradient element that cancels to
    # about its own rounding noise takes a full +-lr step whose sign is the summation order's
    # (sharded mdloo was 1.7e-4 off after one step). With eps = 1e-4 the update moves at most
    # lr * delta / eps for a gradient change delta (~1e-7 relative of per-element terms that are
    # far below 1 after clipping to a global norm of 1), i.e. ~1e-7 per weight per step.
    return OptimizerConfig(name="adamw", peak_lr=1e-2, warmup_steps=1, total_steps=STEPS, weight_decay=0.0, eps=1e-4)


def to_dict(batch):
    return {k: np.asarray(v) for k, v in vars(batch).items()}


def run_unsharded(objective, subset, batches, *, accum_steps=1):
    opt = optimizer_config()
    optimizer = build_optimizer(opt)
    frozen = None if subset is FULL else BASE
    initial = BASE if subset is FULL else None
    step = jax.jit(
        lambda s, b, f: train_step_fn(
            s,
            b,
            f,
            config=CONFIG,
            optimizer=optimizer,
            schedule=lr_schedule(opt),
            step_config=StepConfig(accum_steps=accum_steps),
            mesh=None,
            subset=subset,
            objective=objective,
        )
    )
    state = init_state(CONFIG, optimizer, seed=0, subset=subset, objective=objective, initial=initial)
    losses = []
    for b in batches:
        fields = {k: v.reshape(accum_steps, -1, *v.shape[1:]) if accum_steps > 1 else v for k, v in to_dict(b).items()}
        state, metrics = step(state, type(b)(**{k: jnp.asarray(v) for k, v in fields.items()}), frozen)
        losses.append(float(metrics["loss"]))
    return losses, state


def run_sharded(objective, subset, batches):
    opt = optimizer_config()
    optimizer = build_optimizer(opt)
    mesh = make_mesh(MESH)
    shardings = state_shardings(CONFIG, optimizer, mesh, subset=subset, objective=objective)
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batches[0])
    step = make_train_step(
        config=CONFIG,
        optimizer=optimizer,
        schedule=lr_schedule(opt),
        step_config=StepConfig(),
        mesh=mesh,
        shardings=shardings,
        batch_example=example,
        subset=subset,
        objective=objective,
        frozen=None if subset is FULL else BASE,
    )
    initial = BASE if subset is FULL else None
    state = init_sharded_state(
        CONFIG, optimizer, shardings, seed=0, subset=subset, objective=objective, initial=initial
    )
    losses = []
    for b in batches:
        placed = global_batch(
            to_dict(b), mesh, global_rows=ROWS, accum_steps=1, objective=objective, batch_type=type(b)
        )
        state, metrics = step(state, placed)
        losses.append(float(metrics["loss"]))
    return losses, state


# Each case compiles an 8-device and a 1-device step (about a minute on 2 shared cores): the
# default suite runs one LoRA and one full case with objectives of both kinds (token and pair
# counts), the whole matrix is slow.
FAST = {("sft", "lora"), ("reward_model", "full")}
CASES = [pytest.param(o, s, marks=() if (o, s) in FAST else pytest.mark.slow) for o in OBJECTIVES for s in SUBSETS]


@pytest.mark.parametrize(("objective_name", "subset_name"), CASES)
def test_sharded_equals_unsharded(objective_name, subset_name):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    objective, make_batches = OBJECTIVES[objective_name]
    subset = SUBSETS[subset_name]
    batches = make_batches(np.random.default_rng(0))
    expected, _ = run_unsharded(objective, subset, batches)
    got, state = run_sharded(objective, subset, batches)
    assert len(set(expected)) == STEPS, "the loss moves from step to step (the weights are learning)"
    # The layouts differ only in the order of fp32 sums (~1e-7 relative each), which three steps
    # of the Lipschitz update above (see optimizer_config) carry to well under 1e-4 of the loss.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    if subset_name == "full":  # the layout really is sharded
        embed = state.params["weights"]["embed"] if objective.has_extra else state.params["embed"]
        assert embed.addressable_shards[0].data.size < embed.size


@pytest.mark.parametrize("objective_name", ["sft", "reward_model"])
def test_only_the_trainable_subset_learns(objective_name):
    objective, make_batches = OBJECTIVES[objective_name]
    before = [np.asarray(w).copy() for w in jax.tree.leaves(BASE)]
    _, state = run_unsharded(objective, LORA, make_batches(np.random.default_rng(1)))
    for old, new in zip(before, jax.tree.leaves(BASE)):
        np.testing.assert_array_equal(old, np.asarray(new))
    weights = state.params["weights"] if objective.has_extra else state.params
    # only the adapted layers' A and B are trained, and B moved away from its zero start
    assert set(weights) == {"0", "1"} and all(set(layer) == {"wq", "wv", "w_down"} for layer in weights.values())
    assert all(np.abs(np.asarray(layer[w]["b"])).max() > 0 for layer in weights.values() for w in layer)
    if objective.has_extra:
        fresh = objective.init_extra(CONFIG, jax.random.fold_in(jax.random.split(jax.random.PRNGKey(0))[0], 1))
        assert not np.array_equal(np.asarray(state.params["extra"]["score"]["w"]), np.asarray(fresh["score"]["w"]))


def test_accumulating_pairs_equals_the_full_batch():
    """The reward model's count is pairs (one is padding): summed microbatches divide by the
    pairs of the whole batch, so 4 microbatches step exactly as one batch does."""
    objective, make_batches = OBJECTIVES["reward_model"]
    batches = make_batches(np.random.default_rng(2))
    expected, _ = run_unsharded(objective, FULL, batches)
    got, _ = run_unsharded(objective, FULL, batches, accum_steps=4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("objective_name", ["mdloo", "reward_model"])
def test_microbatches_without_work_are_skipped_without_changing_the_step(objective_name):
    """Spare rows of a packed batch (no loss-mask position, or padding pairs) make whole
    microbatches without work, which the trainer skips (``Objective.has_work``): the losses and
    the trained weights equal those of the batch without them."""
    objective, make_batches = OBJECTIVES[objective_name]
    batches = make_batches(np.random.default_rng(3))
    padded = []
    for b in batches:
        fields = to_dict(b)
        spare = {k: np.zeros_like(v) for k, v in fields.items()}  # masks 0: no work
        padded.append(type(b)(**{k: np.concatenate([v, spare[k]]) for k, v in fields.items()}))
    expected, want = run_unsharded(objective, LORA, batches, accum_steps=2)
    got, state = run_unsharded(objective, LORA, padded, accum_steps=4)
    # The same microbatches (rows 0-3, 4-7) plus exact zeros; the bound only allows for XLA
    # compiling the two loops' bodies apart (a different fusion may round a sum differently).
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), state.params, want.params)
