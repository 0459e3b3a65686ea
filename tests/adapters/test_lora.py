"""LoRA in the one forward path: merged, unmerged, alone and in a mixed batch give the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from float64_reference import SLACK, reference_hidden, reference_logits, rounding_error

from afmkit.adapters.lora import (
    AdapterBank,
    LoraConfig,
    check_adapter,
    init_adapter,
    merge,
    random_adapter,
    single,
    unmerge,
)
from afmkit.errors import UserError
from afmkit.model.transformer import logits_fn


def _logits(model, tokens, adapters=None, params=None):
    return np.asarray(logits_fn(params or model.params, jnp.asarray(tokens), config=model.config, adapters=adapters))


@pytest.fixture(scope="module")
def tokens(smollm2):
    ids = smollm2.tokenizer.encode("Summarize: the cat sat on the mat because it was warm there.")
    other = smollm2.tokenizer.encode("A completely different sentence about rockets and the moon!!")
    n = min(len(ids), len(other))
    return np.array([ids[:n], other[:n]], np.int32)


def test_fresh_adapter_changes_nothing(smollm2, tokens):
    adapter = init_adapter(smollm2.config, LoraConfig(rank=8), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(_logits(smollm2, tokens, single(adapter)), _logits(smollm2, tokens))


def test_merged_equals_unmerged_and_unmerge_restores_the_base(smollm2, tokens, make_adapter):
    adapter = make_adapter(smollm2.config, LoraConfig(rank=16, alpha=32), seed=1)
    both = reference_logits(smollm2, np.concatenate([tokens, tokens]), [None, None, adapter, adapter])
    exact_base, exact = both[:2], both[2:]
    base, unmerged = _logits(smollm2, tokens), _logits(smollm2, tokens, single(adapter))
    # The plain fp32 paths (the bare base, the adapter unmerged) set the rounding bar ...
    rounding = max(rounding_error(base, exact_base), rounding_error(unmerged, exact))
    effect = np.abs(exact - exact_base).max()
    assert effect > 0.1  # the adapter matters
    assert rounding <= 0.01 * effect  # ... and are right: the adapter's effect to two digits
    merged_params = merge(smollm2.params, adapter)
    assert rounding_error(_logits(smollm2, tokens, params=merged_params), exact) <= SLACK * rounding
    # merge rounds W + D to fp32 (half a spacing of the sum), unmerge rounds (W + D) - D with the
    # same D (half a spacing of the result): together at most one spacing of the larger.
    restored = unmerge(merged_params, adapter)
    for w0, w1, w2 in zip(*(jax.tree.leaves(p) for p in (smollm2.params, merged_params, restored))):
        w0, w1, w2 = (np.asarray(w) for w in (w0, w1, w2))
        assert (np.abs(w2 - w0) <= np.spacing(np.maximum(np.abs(w1), np.abs(w2)))).all()
    assert rounding_error(_logits(smollm2, tokens, params=restored), exact_base) <= SLACK * rounding


def test_mixed_batch_rows_match_each_adapter_alone(smollm2, tokens, make_adapter):
    config = smollm2.config
    attn_only = make_adapter(config, LoraConfig(rank=8, targets=("q", "v"), layers=(0, 3, 7)), seed=2, name="qv")
    full = make_adapter(config, LoraConfig(rank=16), seed=3, name="full")
    mlp_only = make_adapter(config, LoraConfig(rank=4, targets=("gate", "up", "down", "o")), seed=4, name="mlp")
    bank = AdapterBank.for_adapters(config, [attn_only, full, mlp_only], slots=6)
    # Rows: each prompt under each adapter and under none, in one batch.
    slots = [0, 1, 2, 3, 1, 0, 3, 2]
    batch = np.concatenate([tokens] * 4)
    by_slot = {0: None, 1: attn_only, 2: full, 3: mlp_only}
    exact = reference_logits(smollm2, batch, [by_slot[slot] for slot in slots])
    exact_base = {row % 2: exact[row] for row, slot in enumerate(slots) if slot == 0}  # each prompt, no adapter
    mixed = _logits(smollm2, batch, bank.rows(slots))
    alone, merged = [], {}
    for row, slot in enumerate(slots):
        adapter = by_slot[slot]
        alone.append(_logits(smollm2, batch[row : row + 1], None if adapter is None else single(adapter))[0])
        if adapter is not None and slot not in merged:  # once per adapter (prompt 0 or 1: row % 2)
            merged[slot] = (row, _logits(smollm2, batch[row : row + 1], params=merge(smollm2.params, adapter))[0])
    rounding = max(rounding_error(alone[row], exact[row]) for row in range(len(slots)))
    effects = [np.abs(exact[row] - exact_base[row % 2]).max() for row, slot in enumerate(slots) if slot]
    assert rounding <= 0.01 * min(effects)  # the plain path is right: each adapter's effect to two digits
    for row, slot in enumerate(slots):
        assert rounding_error(mixed[row], exact[row]) <= SLACK * rounding, (row, slot)
    for slot, (row, logits) in merged.items():
        assert rounding_error(logits, exact[row]) <= SLACK * rounding, slot


def test_merged_unmerged_alone_and_mixed_agree_on_afm_tiny(tiny_model, make_adapter):
    config = tiny_model.config
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (4, 24), 0, config.vocab_size))
    adapters = [make_adapter(config, LoraConfig(rank=16), seed=s, std=0.02) for s in (10, 11, 12)]
    bank = AdapterBank.for_adapters(config, adapters, slots=4)
    slots = [1, 2, 0, 3]
    by_slot = [None, *adapters]
    both = reference_logits(tiny_model, np.concatenate([tokens, tokens]), [by_slot[s] for s in slots] + [None] * 4)
    exact, exact_base = both[:4], both[4:]
    plain = [
        _logits(tiny_model, tokens[row : row + 1], by_slot[slot] and single(by_slot[slot]))[0]
        for row, slot in enumerate(slots)
    ]
    rounding = max(rounding_error(p, e) for p, e in zip(plain, exact))
    mixed = _logits(tiny_model, tokens, bank.rows(slots))
    for row, slot in enumerate(slots):
        assert rounding_error(mixed[row], exact[row]) <= SLACK * rounding
        assert rounding_error(_logits(tiny_model, tokens[row : row + 1], bank.rows([slot]))[0], exact[row]) <= (
            SLACK * rounding
        )
        if slot:
            effect = np.abs(exact[row] - exact_base[row]).max()
            assert effect > 0.01 and rounding <= 0.01 * effect
            merged = _logits(tiny_model, tokens[row : row + 1], params=merge(tiny_model.params, by_slot[slot]))[0]
            assert rounding_error(merged, exact[row]) <= SLACK * rounding


def test_bank_slots_can_be_swapped_without_changing_shapes(smollm2, tokens, make_adapter):
    config = smollm2.config
    a = make_adapter(config, LoraConfig(rank=8, targets=("q", "k")), seed=5, name="a")
    b = make_adapter(config, LoraConfig(rank=8, targets=("q", "k")), seed=6, name="b")
    bank = AdapterBank.for_adapters(config, [a], slots=2)
    shapes = [x.shape for x in jax.tree.leaves(bank.weights)]
    with_a = _logits(smollm2, tokens[:1], bank.rows([1]))
    bank.put(1, b)
    assert [x.shape for x in jax.tree.leaves(bank.weights)] == shapes
    swapped = _logits(smollm2, tokens[:1], bank.rows([1]))
    # The same shapes and values as a bank made for b: the same computation, bit for bit.
    np.testing.assert_array_equal(
        swapped, _logits(smollm2, tokens[:1], AdapterBank.for_adapters(config, [b]).rows([1]))
    )
    assert not np.array_equal(swapped, with_a)
    wide = make_adapter(config, LoraConfig(rank=8, targets=("down",)), seed=7)
    assert not bank.fits(wide)
    with pytest.raises(UserError, match="does not fit"):
        bank.put(1, wide)


def test_bad_configs_and_foreign_adapters_are_refused(smollm2, tiny_model):
    with pytest.raises(UserError, match="targets"):
        LoraConfig(targets=("q", "mlp"))
    with pytest.raises(UserError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(UserError, match="layers"):
        init_adapter(smollm2.config, LoraConfig(layers=(40,)), jax.random.PRNGKey(0))
    adapter = init_adapter(tiny_model.config, LoraConfig(rank=4), jax.random.PRNGKey(0))
    with pytest.raises(UserError, match="another base"):
        check_adapter(smollm2.config, adapter)


def test_decode_schedule_that_reads_the_bank_once_matches_each_row_alone():
    """One token per row and fewer bank slots than rows: the all-slots schedule runs."""
    from afmkit.config import get_size
    from afmkit.model.transformer import forward, init_params

    config = get_size("test-tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    adapters = [random_adapter(config, LoraConfig(rank=4), jax.random.PRNGKey(i), b_std=0.5) for i in range(3)]
    bank = AdapterBank.for_adapters(config, adapters, slots=4)
    slots = np.array([0, 1, 2, 3, 1, 0, 3, 2])
    tokens = jax.random.randint(jax.random.PRNGKey(5), (8, 1), 0, config.vocab_size)
    positions = jnp.full((8, 1), 3, jnp.int32)
    mixed, _ = forward(params, tokens, positions, None, config=config, adapters=bank.rows(slots))
    by_slot = [None, *adapters]
    exact = reference_hidden(config, params, tokens, [by_slot[slot] for slot in slots], positions=[3])
    alone = [
        forward(
            params,
            tokens[row : row + 1],
            positions[row : row + 1],
            None,
            config=config,
            adapters=by_slot[slot] and single(by_slot[slot]),
        )[0][0]
        for row, slot in enumerate(slots)
    ]
    rounding = max(rounding_error(a, e) for a, e in zip(alone, exact))
    for row, slot in enumerate(slots):
        assert rounding_error(mixed[row], exact[row]) <= SLACK * rounding
        if slot:
            base = reference_hidden(config, params, tokens[row : row + 1], positions=[3])[0]
            assert rounding <= 0.01 * np.abs(exact[row] - base).max()  # the adapter's effect to two digits
