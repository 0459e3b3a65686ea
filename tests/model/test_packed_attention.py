"""Attention over packed rows, at a length where it runs block by block (``CAUSAL_BLOCK``): every
document and every shared-prompt branch in a 512-position row gets the hidden states it gets
alone in a row of its own (an independent reference: no mask at all), and the block-by-block
computation steps the trainer exactly as the whole-row one does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit.config import get_size
from afmkit.model import transformer
from afmkit.model.transformer import forward, init_params, output_logits, token_nll
from afmkit.sharding.activations import activation_sharding
from afmkit.sharding.mesh import make_mesh

CONFIG = get_size("test-tiny")
SEQ = 4 * transformer.CAUSAL_BLOCK


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(3))


def packed_row(rng):
    """[document 120][prompt 50 | branch 60 | branch 70][document 60][padding 152]: sequences as
    lists of (row indices, their tokens and positions), and the row's fields."""
    fields = {name: np.zeros(SEQ, np.int32) for name in ("tokens", "positions", "segment_ids", "branch_ids")}
    sequences, at = [], 0

    def put(n, segment, branch, first_position):
        nonlocal at
        span = np.arange(at, at + n)
        fields["tokens"][span] = rng.integers(1, CONFIG.vocab_size, n)
        fields["positions"][span] = first_position + np.arange(n)
        fields["segment_ids"][span], fields["branch_ids"][span] = segment, branch
        at += n
        return span

    sequences.append(put(120, 1, 0, 0))
    prompt = put(50, 2, 0, 0)
    sequences += [np.concatenate([prompt, put(60, 2, 1, 50)]), np.concatenate([prompt, put(70, 2, 2, 50)])]
    sequences.append(put(60, 3, 0, 0))
    assert SEQ - at > transformer.CAUSAL_BLOCK, "padding spans a whole block, the case only padding has"
    return {k: jnp.asarray(v[None]) for k, v in fields.items()}, sequences


def packed_forward(params, rows):
    hidden, _ = forward(
        params,
        rows["tokens"],
        rows["positions"],
        None,
        config=CONFIG,
        segment_ids=rows["segment_ids"],
        branch_ids=rows["branch_ids"],
    )
    return hidden


def test_every_packed_sequence_equals_itself_alone(params):
    row, sequences = packed_row(np.random.default_rng(0))
    hidden = packed_forward(params, row)
    for span in sequences:
        alone, _ = forward(params, row["tokens"][:, span], row["positions"][:, span], None, config=CONFIG)
        # the same keys and values summed in another grouping: fp32 rounding of sums over at most
        # 120 terms of O(1) values, ~1e-6 here
        np.testing.assert_allclose(np.asarray(hidden[0, span]), np.asarray(alone[0]), rtol=1e-4, atol=1e-5)


def test_block_by_block_steps_as_the_whole_row(params, monkeypatch):
    row, _ = packed_row(np.random.default_rng(1))
    targets = jnp.roll(row["tokens"], -1, axis=1)
    mask = (row["segment_ids"] > 0).astype(jnp.float32)

    def loss(p):
        hidden = packed_forward(p, row)
        return (token_nll(output_logits(p, hidden), targets)[0] * mask).sum() / mask.sum()

    blocked = jax.value_and_grad(loss)(params)
    monkeypatch.setattr(transformer, "CAUSAL_BLOCK", SEQ + 1)  # one block: the whole row
    whole = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), blocked[1], whole[1])


# data=1 is what `posttrain rl` traces under (the case that once failed); the 8-device meshes
# compile for a while, so they run with the slow checks
@pytest.mark.parametrize(
    "spec",
    [
        "data=1",
        pytest.param("data=2,fsdp=2,tensor=2", marks=pytest.mark.slow),
        pytest.param("seq=2,data=4", marks=pytest.mark.slow),
    ],
)
def test_on_a_mesh_as_without_one(params, spec):
    """The trainer traces under its mesh (one device too): blocks there, and the whole row where
    the sequence is split over devices; both compute what the unsharded forward does."""
    row, _ = packed_row(np.random.default_rng(2))
    rows = {k: jnp.tile(v, (8, 1)) for k, v in row.items()}  # divisible by every mesh's batch split

    def loss(p):
        hidden = packed_forward(p, rows)
        return (hidden.astype(jnp.float32) ** 2).mean()

    want = jax.jit(jax.value_and_grad(loss))(params)
    devices = jax.devices()[:1] if spec == "data=1" else None
    with activation_sharding(make_mesh(spec, devices=devices)):
        got = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got[1], want[1])


@pytest.mark.parametrize("prefix", [0, 128])
def test_prefill_chunk_block_by_block_as_the_whole_chunk(params, prefix):
    """A prefill chunk that ends its rows' keys (``queries_last``, as the engine's prefill calls it)
    runs block by block, skipping the keys after each block of queries: the same hidden states and
    cache as attending to every key, for a chunk that starts its rows and one after a prefix."""
    from afmkit.model.kv_cache import KVCache

    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (2, prefix + SEQ)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prefix + SEQ), (2, prefix + SEQ))
    results, dots = [], []
    for queries_last in (True, False):
        cache = KVCache.zeros(CONFIG, batch=2, capacity=prefix + SEQ + 1)
        if prefix:
            _, cache = forward(
                params, tokens[:, :prefix], positions[:, :prefix], cache, config=CONFIG, attend_len=prefix
            )

        def chunk(cache, queries_last=queries_last):
            return forward(
                params,
                tokens[:, prefix:],
                positions[:, prefix:],
                cache,
                config=CONFIG,
                attend_len=prefix + SEQ,
                queries_last=queries_last,
            )

        results.append(chunk(cache))
        dots.append(str(jax.make_jaxpr(chunk)(cache)).count("dot_general"))
    # four blocks of queries: two attention products per layer become eight
    assert dots[0] - dots[1] == 6 * CONFIG.n_layers, dots
    (blocked, blocked_cache), (whole, whole_cache) = results
    # the same keys and values, the masked ones left out of the sums: fp32 rounding of sums over at
    # most 640 terms of O(1) values, as in the packed case above
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), blocked_cache, whole_cache)
