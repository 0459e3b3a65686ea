"""LoRA in the one forward path: merged, unmerged, alone and in a mixed batch give the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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

TOL = 1e-4
# Merging rounds W + scale*A@B to fp32 once per weight: half an ulp, which SmolLM2 amplifies
# through 30 layers (its activations have outliers in the hundreds). Scaling every base weight
# by (1 + 1e-7) alone moves its logits by 8.5e-5, so merged-vs-unmerged on SmolLM2 sits at that
# noise floor (random afm-tiny, logits of magnitude ~30, likewise). Alone, unmerged and mixed
# compute the same sums and agree to TOL.
MERGE_TOL = 2.5e-4


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
    base = _logits(smollm2, tokens)
    unmerged = _logits(smollm2, tokens, single(adapter))
    merged_params = merge(smollm2.params, adapter)
    merged = _logits(smollm2, tokens, params=merged_params)
    assert np.abs(unmerged - base).max() > 0.1  # the adapter matters
    assert np.abs(merged - unmerged).max() <= TOL
    restored = unmerge(merged_params, adapter)
    for w0, w1 in zip(jax.tree.leaves(smollm2.params), jax.tree.leaves(restored)):
        assert np.abs(np.asarray(w0) - np.asarray(w1)).max() <= 1e-6
    assert np.abs(_logits(smollm2, tokens, params=restored) - base).max() <= TOL


def test_mixed_batch_rows_match_each_adapter_alone(smollm2, tokens, make_adapter):
    config = smollm2.config
    attn_only = make_adapter(config, LoraConfig(rank=8, targets=("q", "v"), layers=(0, 3, 7)), seed=2, name="qv")
    full = make_adapter(config, LoraConfig(rank=16), seed=3, name="full")
    mlp_only = make_adapter(config, LoraConfig(rank=4, targets=("gate", "up", "down", "o")), seed=4, name="mlp")
    bank = AdapterBank.for_adapters(config, [attn_only, full, mlp_only], slots=6)
    # Rows: each prompt under each adapter and under none, in one batch.
    slots = [0, 1, 2, 3, 1, 0, 3, 2]
    batch = np.concatenate([tokens] * 4)
    mixed = _logits(smollm2, batch, bank.rows(slots))
    by_slot = {0: None, 1: attn_only, 2: full, 3: mlp_only}
    merged = {}
    for row, slot in enumerate(slots):
        adapter = by_slot[slot]
        alone = _logits(smollm2, batch[row : row + 1], None if adapter is None else single(adapter))
        assert np.abs(mixed[row] - alone[0]).max() <= TOL, (row, slot)
        if adapter is not None and slot not in merged:  # once per adapter
            merged[slot] = _logits(smollm2, batch[row : row + 1], params=merge(smollm2.params, adapter))
            assert np.abs(mixed[row] - merged[slot][0]).max() <= MERGE_TOL


def test_merged_unmerged_alone_and_mixed_agree_on_afm_tiny(tiny_model, make_adapter):
    config = tiny_model.config
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (4, 24), 0, config.vocab_size))
    adapters = [make_adapter(config, LoraConfig(rank=16), seed=s, std=0.02) for s in (10, 11, 12)]
    bank = AdapterBank.for_adapters(config, adapters, slots=4)
    slots = [1, 2, 0, 3]
    mixed = _logits(tiny_model, tokens, bank.rows(slots))
    for row, slot in enumerate(slots):
        alone = _logits(tiny_model, tokens[row : row + 1], bank.rows([slot]))[0]
        assert np.abs(mixed[row] - alone).max() <= TOL
        if slot:
            adapter = adapters[slot - 1]
            unmerged = _logits(tiny_model, tokens[row : row + 1], single(adapter))[0]
            merged = _logits(tiny_model, tokens[row : row + 1], params=merge(tiny_model.params, adapter))[0]
            base = _logits(tiny_model, tokens[row : row + 1])[0]
            assert np.abs(unmerged - base).max() > 0.01
            assert np.abs(mixed[row] - unmerged).max() <= TOL
            assert np.abs(mixed[row] - merged).max() <= MERGE_TOL


def test_bank_slots_can_be_swapped_without_changing_shapes(smollm2, tokens, make_adapter):
    config = smollm2.config
    a = make_adapter(config, LoraConfig(rank=8, targets=("q", "k")), seed=5, name="a")
    b = make_adapter(config, LoraConfig(rank=8, targets=("q", "k")), seed=6, name="b")
    bank = AdapterBank.for_adapters(config, [a], slots=2)
    shapes = [x.shape for x in jax.tree.leaves(bank.weights)]
    bank.put(1, b)
    assert [x.shape for x in jax.tree.leaves(bank.weights)] == shapes
    swapped = _logits(smollm2, tokens[:1], bank.rows([1]))
    assert np.abs(swapped - _logits(smollm2, tokens[:1], single(b))).max() <= TOL
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
    for row, slot in enumerate(slots):
        adapter = None if slot == 0 else single(adapters[slot - 1])
        alone, _ = forward(
            params, tokens[row : row + 1], positions[row : row + 1], None, config=config, adapters=adapter
        )
        assert np.abs(np.asarray(mixed[row]) - np.asarray(alone[0])).max() <= 1e-5
        if slot:
            base, _ = forward(params, tokens[row : row + 1], positions[row : row + 1], None, config=config)
            assert np.abs(np.asarray(alone) - np.asarray(base)).max() > 1e-2
