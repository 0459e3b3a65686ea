"""``afmkit posttrain dpo``: the DPO loss and gradient against a float64 numpy transcription of
the formula (Rafailov et al. 2023) on hand-made packed rows; pairs packed by ``pair_rows`` are
scored exactly like each answer after its own prompt; the first step's loss is log 2 (the
reference is the starting policy); training raises the preferred answers' margin on held-out
pairs; replay chats add their weighted NLL (the same transcription), pack like an answer after
its own prompt and keep their text likelier than training without them; the anchor adds its
weighted KL (a float64 numpy transcription of the lumped KL), holds the policy nearer the base on
unseen text of its kind than the same run without it, and resumes from its saved top-k; bad input
is one line and writes nothing."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.cli import EXIT_USER_ERROR, main
from afmkit.errors import UserError
from afmkit.posttrain import losses
from afmkit.posttrain.dpo import DPOSettings, Pair, dpo, pair_rows, pair_tokens, read_pairs
from afmkit.posttrain.rollout import response_token_logprobs
from afmkit.train.metrics import read_metrics
from afmkit.train.objectives import (
    AnchoredPolicyBatch,
    ModelView,
    Policy,
    PolicyBatch,
    Preference,
    top_k_distribution,
)


def np_dpo(new, ref, mask, branch, preference, beta, nll_weight, replay_weight=0.0):
    """Sum over pairs of -log sigmoid(beta * (log ratio preferred - log ratio other)) plus
    nll_weight times the preferred answer's mean token NLL, plus replay_weight times each replay
    chat's (slots marked +1, 0) mean token NLL, float64."""
    total, pairs = 0.0, 0
    for n in range(new.shape[0]):
        ratio = [float(((new[n] - ref[n]) * mask[n] * (branch[n] == s + 1)).sum()) for s in range(preference.shape[1])]
        for j in range(0, preference.shape[1], 2):
            if preference[n, j] == 0:
                continue
            if preference[n, j + 1] == 0:  # a replay chat
                total -= replay_weight * new[n][(mask[n] > 0) & (branch[n] == j + 1)].mean()
                continue
            margin = beta * (preference[n, j] * ratio[j] + preference[n, j + 1] * ratio[j + 1])
            best = j if preference[n, j] > 0 else j + 1
            on = (mask[n] > 0) & (branch[n] == best + 1)
            total += math.log1p(math.exp(-margin)) - nll_weight * new[n][on].mean()
            pairs += 1
    return total, pairs


def hand_made_rows():
    """Two rows; row 0 holds two pairs (slots 0-1 and 2-3, the second with the preferred answer in
    the odd slot), row 1 one pair and an empty slot pair; one masked token holds NaN."""
    rng = np.random.default_rng(0)
    branch = np.array([[0, 1, 1, 2, 2, 2, 0, 3, 4, 4], [0, 0, 1, 1, 1, 2, 2, 0, 0, 0]], np.int32)
    mask = (branch > 0).astype(np.float32)
    new = rng.normal(-2.0, 1.0, branch.shape).astype(np.float32)
    ref = rng.normal(-2.0, 1.0, branch.shape).astype(np.float32)
    new[1, 8] = np.nan  # padding: must not reach the loss or its gradient
    preference = np.array([[1, -1, -1, 1], [1, -1, 0, 0]], np.float32)
    return new, ref, mask, branch, preference


def loss_on(ref, mask, branch, preference, **weights):
    """``dpo_loss`` of new log-probs ``x`` on these hand-made rows: ``(total, metrics)``."""
    return lambda x: losses.dpo_loss(
        x, jnp.asarray(ref), jnp.asarray(mask), jnp.asarray(preference), segment_ids=jnp.asarray(branch), **weights
    )


@pytest.mark.parametrize("nll_weight", [0.0, 0.7])
def test_dpo_loss_and_gradient_match_the_formula(nll_weight):
    new, ref, mask, branch, preference = hand_made_rows()
    beta = 0.3
    loss = loss_on(ref, mask, branch, preference, beta=beta, nll_weight=nll_weight)

    (total, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(new))
    clean = np.where(mask > 0, new, 0.0).astype(np.float64)
    want, pairs = np_dpo(clean, ref.astype(np.float64), mask, branch, preference, beta, nll_weight)
    # fp32 sums of ~5 terms of size ~3: relative error a few ulp of 2^-23, times log1p's slope <= 1
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert float(metrics["count"]) == pairs == 3
    # d/d new[n, t] of softplus(-margin) = -sigmoid(-margin) * beta * preference of t's slot; the
    # NLL term adds -nll_weight / (the preferred answer's length) on the preferred answer's tokens
    expected = np.zeros_like(clean)
    for n in range(2):
        for j in range(0, 4, 2):
            if preference[n, j] == 0:
                continue
            ratio = [((clean[n] - ref[n]) * mask[n] * (branch[n] == s + 1)).sum() for s in (j, j + 1)]
            margin = beta * (preference[n, j] * ratio[0] + preference[n, j + 1] * ratio[1])
            for s in (j, j + 1):
                on = branch[n] == s + 1
                expected[n, on] = -beta * preference[n, s] / (1 + math.exp(margin))
                if preference[n, s] > 0:
                    expected[n, on] -= nll_weight / on.sum()
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)
    # the sign: raising the preferred answer's log-probability lowers the loss
    up = new.copy()
    up[0, 1:3] += 0.5  # slot 0 of row 0, preferred
    assert float(loss(jnp.asarray(np.where(mask > 0, up, 0)))[0]) < float(loss(jnp.asarray(clean, jnp.float32))[0])


def test_replay_chats_add_their_weighted_nll_and_no_pair():
    """Row 1's empty slot pair becomes a replay chat (+1, 0) of three tokens: the loss gains
    replay_weight times its mean token NLL (the numpy transcription), its gradient is
    -replay_weight / 3 on those tokens, and the pair metrics do not count it."""
    new, ref, mask, branch, preference = hand_made_rows()
    branch[1, 7:10] = 3
    mask = (branch > 0).astype(np.float32)
    new[1, 8] = -1.5
    preference[1, 2] = 1
    beta, nll_weight, replay_weight = 0.3, 0.7, 0.4

    def loss(x, weight):
        return loss_on(ref, mask, branch, preference, beta=beta, nll_weight=nll_weight, replay_weight=weight)(x)

    (total, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(new), replay_weight)
    clean = np.where(mask > 0, new, 0.0).astype(np.float64)
    want, pairs = np_dpo(clean, ref.astype(np.float64), mask, branch, preference, beta, nll_weight, replay_weight)
    # as the test above: fp32 sums of a few terms of size ~3, a few ulp relative
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert float(metrics["count"]) == pairs == 3 and float(metrics["replay_chats"]) == 1
    replay = branch[1] == 3
    np.testing.assert_allclose(float(metrics["replay_nll"]), -clean[1, replay].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["replay_log_ratio"]), (clean[1] - ref[1])[replay].mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad)[1, replay], -replay_weight / 3, rtol=1e-6)
    # without the weight the chat is inert: no gradient on it, the pairs' loss alone
    (alone, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(new), 0.0)
    assert not np.asarray(grad)[1, replay].any() and "replay_nll" not in metrics
    np.testing.assert_allclose(
        float(alone), np_dpo(clean, ref, mask, branch, preference, beta, nll_weight)[0], rtol=1e-5
    )


def test_dpo_refuses_a_bad_beta_or_an_odd_slot_count():
    new, ref, mask, branch, preference = hand_made_rows()
    with pytest.raises(UserError, match="beta must be positive"):
        losses.dpo_loss(new, ref, mask, preference, beta=0.0, segment_ids=branch)
    with pytest.raises(UserError, match="even number"):
        losses.dpo_loss(new, ref, mask, preference[:, :3], beta=0.1, segment_ids=branch)


def pairs_for(words):
    return [
        Pair(
            [{"role": "user", "content": f"Shout the word {w}."}, {"role": "assistant", "content": w.upper()}],
            w.lower(),
        )
        for w in words
    ]


WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "light", "sugar", "grape", "lemon"]


def test_packed_pairs_score_each_answer_as_after_its_own_prompt(tiny_model):
    """``pair_rows``: each answer's log-probs under the ``Preference`` objective's forward equal a
    separate forward on its prompt + answer; a pair's preferred answer sits in an even slot marked
    +1, the other in the next, -1; with the reference equal to the policy the loss is log 2 a pair."""
    tokenized = [pair_tokens(tiny_model.tokenizer, p) for p in pairs_for(WORDS[:5])]
    rows = pair_rows(tokenized, 128)
    assert len(rows["tokens"]) < 5  # pairs share rows
    view = ModelView(config=tiny_model.config, params=tiny_model.params, adapters=None, compute_dtype=jnp.float32)
    fields = ("tokens", "positions", "segment_ids", "targets", "branch_ids")
    got = np.asarray(view.target_log_probs(*(jnp.asarray(rows[f]) for f in fields)))
    prompts = [p for p, _, _ in tokenized for _ in range(2)]
    answers = [a for _, c, r in tokenized for a in (c, r)]
    want = response_token_logprobs(tiny_model.params, tiny_model.config, prompts, answers, None)
    found = 0
    for n in range(len(rows["tokens"])):
        for s in np.flatnonzero(rows["advantages"][n]):
            on = (rows["loss_mask"][n] > 0) & (rows["branch_ids"][n] == s + 1)
            i = next(i for i, a in enumerate(answers) if list(rows["targets"][n][on]) == a and i % 2 == s % 2)
            assert rows["advantages"][n, s] == (1.0 if s % 2 == 0 else -1.0) and i % 2 == s % 2
            np.testing.assert_allclose(got[n][on], want[i, : len(answers[i])], atol=1e-4)
            found += 1
    assert found == 10
    rows["old_log_probs"] = np.where(rows["loss_mask"] > 0, got, 0.0)
    batch = PolicyBatch(**{k: jnp.asarray(v) for k, v in rows.items()})
    total, metrics = Preference(beta=0.1).loss(view, None, batch)
    assert float(metrics["count"]) == 5
    np.testing.assert_allclose(float(total), 5 * math.log(2), rtol=1e-6)


def replay_for(words):
    return [
        Pair([{"role": "user", "content": f"Spell {w}."}, {"role": "assistant", "content": " ".join(w)}], None)
        for w in words
    ]


def test_packed_replay_chats_score_their_answer_after_its_own_prompt(tiny_model):
    """A replay chat packs as its answer in an even slot, +1, the next slot empty (no tokens),
    0, scored exactly as a separate forward on its prompt + answer; the pairs around it keep
    their +1 / -1 slots."""
    tokenized = [pair_tokens(tiny_model.tokenizer, p) for p in pairs_for(WORDS[:3]) + replay_for(WORDS[3:6])]
    assert all(rejected is None for _, _, rejected in tokenized[3:])
    rows = pair_rows(tokenized, 128)
    view = ModelView(config=tiny_model.config, params=tiny_model.params, adapters=None, compute_dtype=jnp.float32)
    fields = ("tokens", "positions", "segment_ids", "targets", "branch_ids")
    got = np.asarray(view.target_log_probs(*(jnp.asarray(rows[f]) for f in fields)))
    replays = [(p, a) for p, a, _ in tokenized[3:]]
    want = response_token_logprobs(tiny_model.params, tiny_model.config, *zip(*replays), None)
    on = rows["loss_mask"] > 0
    found = 0
    for n, s in zip(*np.nonzero(rows["advantages"] == 1.0)):
        if rows["advantages"][n, s + 1] != 0:
            assert rows["advantages"][n, s + 1] == -1.0 and s % 2 == 0
            continue
        assert s % 2 == 0 and not (on[n] & (rows["branch_ids"][n] == s + 2)).any()
        answer = list(rows["targets"][n][on[n] & (rows["branch_ids"][n] == s + 1)])
        i = [a for _, a in replays].index(answer)
        np.testing.assert_allclose(got[n][on[n] & (rows["branch_ids"][n] == s + 1)], want[i, : len(answer)], atol=1e-4)
        found += 1
    assert found == 3 and (rows["advantages"] == -1.0).sum() == 3


def test_replay_keeps_its_text_likelier_than_training_without_it(tiny_model, tmp_path):
    """The same DPO run with and without replay chats (text no pair is about, here spelled
    words): with them, the trained model gives their answers a higher log-probability."""
    from afmkit.adapters.peft_io import load_adapter

    settings = DPOSettings(
        lora_rank=4, steps=8, lr=3e-3, warmup=1, batch=2, seq_len=128, eval_fraction=0.25, beta=0.5, nll_weight=0.0
    )
    pairs, replay = pairs_for(WORDS), replay_for(["table", "chair", "glass", "plate"])
    with pytest.raises(UserError, match="positive --replay-weight"):
        dpo(tiny_model, pairs + replay, tmp_path / "refused", settings)
    scores = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"replay-{weight}"
        run = dataclasses.replace(settings, replay_weight=weight)
        results = dpo(tiny_model, pairs + (replay if weight else []), out, run)
        assert results["replay_chats"] == (4 if weight else 0) and results["train_pairs"] == 9
        adapter = load_adapter(out, config=tiny_model.config)
        prompts, answers = zip(*[pair_tokens(tiny_model.tokenizer, p)[:2] for p in replay])
        logp = response_token_logprobs(tiny_model.params, tiny_model.config, prompts, answers, adapter)
        scores[weight] = sum(float(logp[i, : len(a)].sum()) for i, a in enumerate(answers))
    assert scores[1.0] > scores[0.0]


def test_training_raises_the_preferred_answers_margin(tiny_model, tmp_path, capsys):
    out = tmp_path / "dpo"
    settings = DPOSettings(
        lora_rank=4,
        steps=12,
        lr=3e-3,
        warmup=1,
        batch=2,
        seq_len=128,
        eval_fraction=0.25,
        beta=0.5,
        nll_weight=0.0,
    )
    results = dpo(tiny_model, pairs_for(WORDS + [w + "s" for w in WORDS]), out, settings)
    # the reference log-probs and the held-out loss come from two separately compiled forwards:
    # fp32 rounding of per-token log-probs (~|log p| * 2^-23, about 1e-6) over ~20 tokens per
    # answer, times beta, moves log 2 by about 1e-6 relative; 1e-4 leaves room for any CPU
    assert results["held_out_loss_start"] == pytest.approx(math.log(2), rel=1e-4)
    assert results["held_out_loss_end"] < 0.9 * math.log(2)
    records = read_metrics(out / "training" / "metrics.jsonl")
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert records[-1]["accuracy"] > records[0]["accuracy"] or records[-1]["accuracy"] == 1.0
    assert (out / "adapter_config.json").is_file() and json.loads((out / "training.json").read_text())["steps_done"]
    # the reference pass (minutes on a real data set) reports its progress, as training does
    assert "reference log-probs:" in capsys.readouterr().err


def test_a_resumed_run_reads_its_reference_and_ends_as_an_uninterrupted_one(tiny_model, tmp_path, monkeypatch):
    """--resume reads the saved reference log-probs instead of recomputing them (the pass takes
    minutes on real data), and the run ends bit for bit where an uninterrupted one does; values
    of other data are refused before any pass, a damaged file is recomputed."""
    from afmkit.adapters.peft_io import load_adapter
    from afmkit.posttrain import dpo as dpo_module

    settings = DPOSettings(
        lora_rank=4, lr=3e-3, warmup=1, batch=2, seq_len=128, eval_fraction=0.25, nll_weight=0.5, save_every=2
    )
    pairs = pairs_for(WORDS)
    straight, split = tmp_path / "straight", tmp_path / "split"
    dpo(tiny_model, pairs, straight, dataclasses.replace(settings, steps=4))
    dpo(tiny_model, pairs, split, dataclasses.replace(settings, steps=2))
    compute = dpo_module.reference_log_probs

    def refuse(*args, **kwargs):
        raise AssertionError("the reference pass ran again")

    monkeypatch.setattr(dpo_module, "reference_log_probs", refuse)
    dpo(tiny_model, pairs, split, dataclasses.replace(settings, steps=4, resume=True))
    a, b = (load_adapter(out, config=tiny_model.config) for out in (straight, split))
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights)):
        np.testing.assert_array_equal(x, y)
    last = [read_metrics(out / "training" / "metrics.jsonl")[-1] for out in (straight, split)]
    assert last[0]["step"] == last[1]["step"] == 4 and last[0]["loss"] == last[1]["loss"]
    # Reference values of other rows or another starting adapter (another fingerprint) beside a
    # checkpoint: a one-line refusal before the reference pass, not after it.
    with np.load(split / dpo_module.REFERENCE_FILE) as saved:
        train, held_out = saved["train"], saved["held_out"]
    dpo_module.save_reference(
        split, "another run", {"train": np.zeros_like(train), "held_out": np.zeros_like(held_out)}
    )
    with pytest.raises(UserError, match="trained on other pairs, another anchor text or from another starting adapter"):
        dpo(tiny_model, pairs, split, dataclasses.replace(settings, steps=5, resume=True))
    # A damaged file is computed again, and the run resumes.
    (split / dpo_module.REFERENCE_FILE).write_bytes(b"not an npz")
    calls = []
    monkeypatch.setattr(dpo_module, "reference_log_probs", lambda *a, **k: calls.append(1) or compute(*a, **k))
    dpo(tiny_model, pairs, split, dataclasses.replace(settings, steps=5, resume=True))
    assert len(calls) == 2  # train and held-out rows
    with np.load(split / dpo_module.REFERENCE_FILE) as saved:
        np.testing.assert_array_equal(saved["train"], train)


def np_lumped_kl(student_logits, ids, teacher_log_probs, teacher_tail):
    """KL(teacher || student) over the teacher's top-k tokens and one bucket for the rest,
    float64, per position."""
    logits = np.asarray(student_logits, np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    student_top = np.take_along_axis(log_p, ids, axis=-1)
    student_tail = np.log1p(-np.exp(student_top).sum(-1))
    p_top, p_tail = np.exp(np.float64(teacher_log_probs)), np.exp(np.float64(teacher_tail))
    return (p_top * (teacher_log_probs - student_top)).sum(-1) + p_tail * (teacher_tail - student_tail)


ANCHORED_OBJECTIVES = {
    "dpo": (lambda w: Preference(beta=0.5, nll_weight=0.3, anchor_weight=w), 5),  # per pair
    "mdloo": (lambda w: Policy(algo="mdloo", step_size=0.5, anchor_weight=w), 10),  # per sample
    "ppo-clip": (lambda w: Policy(algo="ppo-clip", anchor_weight=w), "tokens"),  # per response token
}


@pytest.mark.parametrize("name", sorted(ANCHORED_OBJECTIVES))
def test_the_anchor_adds_its_weighted_kl_per_pair_or_sample(tiny_model, name):
    """``anchor_weight=W`` = the objective's own loss + W x its count (DPO's pairs, MDLOO's samples,
    PPO-clip's tokens) x
    the mean per-token KL(teacher || policy) over the rows' anchor windows (float64 numpy of the
    lumped KL, the teacher another random model's top-k); with W = 0 the anchor fields change
    nothing. The pairs' +1 / -1 serve the policy losses as advantages."""
    make, count = ANCHORED_OBJECTIVES[name]
    tokenized = [pair_tokens(tiny_model.tokenizer, p) for p in pairs_for(WORDS[:5])]
    rows = pair_rows(tokenized, 128)
    n, length, k = len(rows["tokens"]), 16, 4
    rng = np.random.default_rng(1)
    rows["old_log_probs"] = np.where(rows["loss_mask"] > 0, rng.normal(-3, 1, rows["tokens"].shape), 0).astype(
        np.float32
    )
    anchor = rng.integers(0, tiny_model.config.vocab_size, (n, length)).astype(np.int32)
    teacher_logits = jnp.asarray(rng.normal(0, 3, (n, length, tiny_model.config.vocab_size)), jnp.float32)
    ids, log_probs, tail = (np.asarray(a) for a in top_k_distribution(teacher_logits, k))
    mask = np.ones((n, length), np.float32)
    mask[-1, length // 2 :] = 0  # the last window half used: the rest must not count
    batch = AnchoredPolicyBatch(
        **{name: jnp.asarray(value) for name, value in rows.items()},
        anchor_tokens=jnp.asarray(anchor),
        anchor_positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length)),
        anchor_segment_ids=jnp.ones((n, length), jnp.int32),
        anchor_mask=jnp.asarray(mask),
        anchor_teacher_ids=jnp.asarray(ids),
        anchor_teacher_log_probs=jnp.asarray(log_probs),
        anchor_teacher_tail_log_prob=jnp.asarray(tail),
    )
    view = ModelView(config=tiny_model.config, params=tiny_model.params, adapters=None, compute_dtype=jnp.float32)
    plain, plain_metrics = make(0.0).loss(view, None, batch)
    anchored, metrics = make(2.0).loss(view, None, batch)
    student = view.logits(view.hidden(batch.anchor_tokens, batch.anchor_positions, batch.anchor_segment_ids))
    kl = np_lumped_kl(student, ids, log_probs, tail)
    mean_kl = (kl * mask).sum() / mask.sum()
    units = float(plain_metrics["count"])
    assert (
        units == (rows["loss_mask"].sum() if count == "tokens" else count) and mean_kl > 0.1
    )  # a real divergence: the two random models differ
    # fp32 log-softmax over the vocabulary (errors ~1e-6 relative per term) against float64
    assert float(metrics["anchor_kl"]) == pytest.approx(units * mean_kl, rel=1e-4)
    assert float(anchored) == pytest.approx(float(plain) + 2.0 * units * mean_kl, rel=1e-4)
    without, _ = make(0.0).loss(view, None, PolicyBatch(**{f: getattr(batch, f) for f in rows}))
    assert float(without) == float(plain)


ANCHOR_TEXT = " ".join(
    f"The {a} and the {b} went down to the {c} at dawn, and nobody saw them come back."
    for a in WORDS
    for b in WORDS[:6]
    for c in ("sea", "hill")
)


@pytest.mark.slow  # three DPO runs: plain, anchored and a resumed one
def test_the_anchor_holds_the_policy_near_the_base_on_unseen_text(
    peaked_model, tmp_path, monkeypatch, window_log_probs
):
    """The same DPO run with and without an anchor: with it, the trained policy's KL from the base
    on the anchor text's held-out windows (a float64 full-vocabulary KL of the two models' logits)
    is smaller (a peaked random model: a few dozen tokens carry each distribution, so the base's
    top-k hold most of it, as for a trained model); the first step's anchor KL is 0 (a fresh adapter is the base); a resumed run reads
    the saved top-k instead of recomputing them and ends as the uninterrupted one."""
    from afmkit.adapters.lora import single
    from afmkit.adapters.peft_io import load_adapter
    from afmkit.posttrain import dpo as dpo_module

    text = tmp_path / "anchor.txt"
    text.write_text(ANCHOR_TEXT)
    settings = DPOSettings(
        lora_rank=4, steps=8, lr=3e-3, warmup=1, batch=2, seq_len=128, eval_fraction=0.25, beta=0.5, nll_weight=1.0
    )
    anchored = dataclasses.replace(settings, anchor_text=str(text), anchor_weight=20.0, anchor_len=32, anchor_top_k=8)
    pairs = pairs_for(WORDS)
    short = tmp_path / "short.txt"
    short.write_text("Too short to cut into windows.")
    with pytest.raises(UserError, match=r"short\.txt holds 0 windows of 32 tokens; the run needs at least 3"):
        dpo(peaked_model, pairs, tmp_path / "refused", dataclasses.replace(anchored, anchor_text=str(short)))
    assert not (tmp_path / "refused").exists()
    runs = {"plain": settings, "anchored": anchored}
    for name, run in runs.items():
        results = dpo(peaked_model, pairs, tmp_path / name, run)
    assert results["anchor_windows"] > 1
    first = read_metrics(tmp_path / "anchored" / "training" / "metrics.jsonl")[0]
    assert first["anchor_kl"] == pytest.approx(0.0, abs=1e-5)
    windows = dpo_module.anchor_windows(peaked_model, anchored, 1, 2)[1]  # the held-out windows
    base = ModelView(config=peaked_model.config, params=peaked_model.params, adapters=None, compute_dtype=jnp.float32)
    reference = window_log_probs(base, windows)
    kl = {}
    for name in runs:
        adapter = load_adapter(tmp_path / name, config=peaked_model.config)
        policy = window_log_probs(dataclasses.replace(base, adapters=single(adapter)), windows)
        kl[name] = float((np.exp(reference) * (reference - policy)).sum(-1).mean())
    assert kl["anchored"] < 0.5 * kl["plain"], kl

    def refuse(*args, **kwargs):
        raise AssertionError("the base's top-k were computed again")

    split = tmp_path / "split"
    dpo(peaked_model, pairs, split, dataclasses.replace(anchored, steps=4, save_every=2))
    monkeypatch.setattr(dpo_module, "with_teacher", refuse)
    dpo(peaked_model, pairs, split, dataclasses.replace(anchored, save_every=2, resume=True))
    a, b = (load_adapter(out, config=peaked_model.config) for out in (tmp_path / "anchored", split))
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights)):
        np.testing.assert_array_equal(x, y)
    # the saved top-k belong to the text's content, not its name: an edited file is refused
    text.write_text(ANCHOR_TEXT.replace("dawn", "dusk"))
    with pytest.raises(UserError, match="another anchor text"):
        dpo(peaked_model, pairs, split, dataclasses.replace(anchored, steps=10, save_every=2, resume=True))
    with pytest.raises(UserError, match="--anchor-top-k must be below the vocabulary's 49152 tokens"):
        dpo(peaked_model, pairs, tmp_path / "refused", dataclasses.replace(anchored, anchor_top_k=49152))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data.write_text(json.dumps(chat))
    with pytest.raises(UserError, match="no preference pairs"):
        read_pairs(data)
    data.write_text(json.dumps(chat) + "\n" + json.dumps({**chat, "rejected": "c"}) + "\n")
    assert read_pairs(data) == [Pair(chat["messages"], "c")]  # chats without 'rejected' are skipped
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat) + "\n\n" + json.dumps({**chat, "rejected": ["c"]}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:3: a preference pair needs"):
        read_pairs(bad)
    # with replay, the chats without 'rejected' come back as replay chats, and must end in an answer
    data.write_text(json.dumps(chat) + "\n" + json.dumps({**chat, "rejected": "c"}) + "\n")
    assert read_pairs(data, replay=True) == [Pair(chat["messages"], None), Pair(chat["messages"], "c")]
    question = {"messages": [*chat["messages"], {"role": "user", "content": "and?"}]}
    bad.write_text(json.dumps(question) + "\n" + json.dumps({**chat, "rejected": "c"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:1: a replay chat needs"):
        read_pairs(bad, replay=True)
    data.write_text(json.dumps(chat))
    out = tmp_path / "out"
    for flags, message in (
        (["--beta", "0"], "--beta must be positive"),
        (["--replay-weight", "-1"], "--replay-weight must be at least 0"),
        (["--full"], "drop --full"),
        (["--anchor-weight", "1"], "--anchor-text and a positive --anchor-weight go together"),
        (["--anchor-text", str(data)], "--anchor-text and a positive --anchor-weight go together"),
        (["--anchor-weight", "-1"], "--anchor-weight must be at least 0"),
        ([], "no preference pairs"),
    ):
        code = main(["posttrain", "dpo", "--data", str(data), "--out", str(out), *flags])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_USER_ERROR and message in err and len(err.splitlines()) == 1
        assert not out.exists()
