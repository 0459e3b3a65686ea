"""The packed-row loader: deterministic, resumable from its state, shardable over processes."""

import numpy as np
import pytest

from afmkit.data.loader import PackedLoader
from afmkit.data.packing import TokenStream
from afmkit.errors import UserError


def stream(n_tokens=2000, doc_len=37):
    tokens = np.arange(n_tokens, dtype=np.int32) % 500
    return TokenStream(tokens, np.arange(0, n_tokens, doc_len, dtype=np.int64), "fp")


def take(loader, n, positions=None):
    return [loader.next_batch(positions) for _ in range(n)]


def test_same_seed_same_batches_and_a_new_seed_changes_them():
    a = take(PackedLoader(stream(), seq_len=16, global_batch=4, seed=3), 5)
    b = take(PackedLoader(stream(), seq_len=16, global_batch=4, seed=3), 5)
    c = take(PackedLoader(stream(), seq_len=16, global_batch=4, seed=4), 5)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))


def test_restore_continues_exactly_where_the_state_was_saved():
    full = take(PackedLoader(stream(), seq_len=16, global_batch=4, seed=0), 40)  # crosses epochs
    first = PackedLoader(stream(), seq_len=16, global_batch=4, seed=0)
    take(first, 17)
    saved = first.state()
    resumed = PackedLoader(stream(), seq_len=16, global_batch=4, seed=0)
    resumed.restore(saved)
    for expected, got in zip(full[17:], take(resumed, 23)):
        np.testing.assert_array_equal(expected["tokens"], got["tokens"])
        np.testing.assert_array_equal(expected["segment_ids"], got["segment_ids"])


def test_each_epoch_visits_every_row_once():
    loader = PackedLoader(stream(), seq_len=16, global_batch=1, seed=0)
    epoch = [int(loader.row_indices(step)[0]) for step in range(loader.rows)]
    assert sorted(epoch) == list(range(loader.rows))


def test_process_shards_partition_the_global_batch():
    whole = PackedLoader(stream(), seq_len=16, global_batch=8, seed=0).next_batch()
    halves = [
        PackedLoader(stream(), seq_len=16, global_batch=8, seed=0).next_batch(np.arange(p * 4, p * 4 + 4))
        for p in (0, 1)
    ]
    np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), whole["tokens"])


def test_restoring_a_different_run_or_a_tiny_corpus_is_an_error():
    loader = PackedLoader(stream(), seq_len=16, global_batch=4, seed=0)
    state = loader.state()
    other = PackedLoader(stream(), seq_len=16, global_batch=4, seed=1)
    with pytest.raises(UserError, match="seed=0 but this run has 1"):
        other.restore(state)
    with pytest.raises(UserError, match="fewer than one row"):
        PackedLoader(stream(n_tokens=10), seq_len=16, global_batch=4, seed=0)
