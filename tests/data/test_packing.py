"""Packing documents into fixed-length rows: EOS separators, per-document segments and
positions, and no attention across documents (a packed row gives each document the same
logits as running it alone)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from afmkit.config import get_size
from afmkit.data.corpus import Document
from afmkit.data.packing import TokenStream, pack_rows, separator_id, tokenize_documents
from afmkit.data.tokenizer import Tokenizer
from afmkit.errors import UserError
from afmkit.model.transformer import forward, init_params, output_logits


def small_tokenizer(vocab_size: int = 300) -> Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(
        ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"] * 20, trainer
    )
    return Tokenizer(backend, eos_token="<|endoftext|>")


def stream_of(lengths):
    """Documents whose tokens are 100+doc*10+i, each followed by separator 1."""
    tokens, starts = [], []
    for d, n in enumerate(lengths):
        starts.append(len(tokens))
        tokens += [100 + 10 * d + i for i in range(n)] + [1]
    return TokenStream(np.array(tokens, np.int32), np.array(starts, np.int64), "test")


def test_rows_hold_documents_with_separators_segments_and_restarting_positions():
    stream = stream_of([3, 4, 2])  # stream: a0 a1 a2 | b0 b1 b2 b3 | c0 c1 |  (| = separator 1)
    rows = pack_rows(stream, np.array([0, 1]), seq_len=5)
    np.testing.assert_array_equal(rows["tokens"][0], [100, 101, 102, 1, 110])
    np.testing.assert_array_equal(rows["targets"][0], [101, 102, 1, 110, 111])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 2])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 0])
    # the separator's target is the next document's first token: no loss there
    np.testing.assert_array_equal(rows["loss_mask"][0], [1, 1, 1, 0, 1])
    # row 1 starts mid-document (rows share one boundary token): positions restart at the row
    np.testing.assert_array_equal(rows["tokens"][1], [111, 112, 113, 1, 120])
    np.testing.assert_array_equal(rows["positions"][1], [0, 1, 2, 3, 0])
    np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 1, 1, 2])
    np.testing.assert_array_equal(rows["loss_mask"][1], [1, 1, 1, 0, 1])


def test_tokenize_documents_appends_separators_and_caches(tmp_path):
    tokenizer = small_tokenizer()
    docs = [Document("def f(x):\n    return x\n", "a"), Document("the lazy dog", "b")]
    stream = tokenize_documents(docs, tokenizer, cache_dir=tmp_path)
    sep = separator_id(tokenizer)
    assert sep == tokenizer.backend.token_to_id("<|endoftext|>")
    first = tokenizer.encode(docs[0].text)
    np.testing.assert_array_equal(stream.tokens[: len(first) + 1], [*first, sep])
    assert stream.doc_starts.tolist() == [0, len(first) + 1]
    assert stream.tokens[-1] == sep and (stream.tokens == sep).sum() == 2
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = tokenize_documents(docs, tokenizer, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.tokens, stream.tokens)
    assert again.fingerprint == stream.fingerprint
    changed = tokenize_documents([*docs[:1], Document("the quick fox", "b")], tokenizer, cache_dir=tmp_path)
    assert changed.fingerprint != stream.fingerprint
    with pytest.raises(UserError, match="corpus is empty"):
        tokenize_documents([], tokenizer)


def test_packed_documents_never_attend_to_each_other():
    config = get_size("test-tiny")
    params = init_params(config, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(2, config.vocab_size, 7), rng.integers(2, config.vocab_size, 9)
    tokens = jnp.asarray(np.concatenate([doc_a, doc_b])[None], jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(7), np.arange(9)])[None], jnp.int32)
    segments = jnp.asarray(np.array([1] * 7 + [2] * 9)[None], jnp.int32)
    hidden, _ = forward(params, tokens, positions, None, config=config, segment_ids=segments)
    packed = np.asarray(output_logits(params, hidden))[0]
    for doc, where in ((doc_a, slice(0, 7)), (doc_b, slice(7, 16))):
        alone_tokens = jnp.asarray(doc[None], jnp.int32)
        alone_hidden, _ = forward(params, alone_tokens, jnp.arange(len(doc))[None], None, config=config)
        np.testing.assert_allclose(packed[where], np.asarray(output_logits(params, alone_hidden))[0], atol=2e-5)
    # without segment ids the second document would see the first: the logits differ
    leaky, _ = forward(params, tokens, positions, None, config=config)
    assert not np.allclose(np.asarray(output_logits(params, leaky))[0, 7:], packed[7:], atol=1e-3)
