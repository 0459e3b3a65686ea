"""The paged KV cache and chunked prefill (issue 11 §2): a pool of blocks with per-row block
tables gives the contiguous cache's tokens exactly, whether prompts are prefilled whole or in
chunks between decode steps, with adapters, with rows joining mid-decode; blocks come back when
rows end; a full pool makes requests wait without harming the rows that run."""

import queue

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afmkit import kernels
from afmkit.adapters.lora import LoraConfig, random_adapter
from afmkit.errors import UserError
from afmkit.infer.engine import Engine, KVSettings, Request, pool_size
from afmkit.infer.sampling import SamplingParams
from afmkit.infer.scheduler import Scheduler
from afmkit.model.kv_cache import UNALLOCATED, PagedLayer, quantize_int8

KV, D, PAGE = 2, 8, 4


def _pool(blocks, quantized=False):
    store = jnp.int8 if quantized else jnp.float32
    scales = (jnp.zeros((blocks, KV, PAGE)), jnp.zeros((blocks, KV, PAGE))) if quantized else (None, None)
    return jnp.zeros((blocks, KV, D, PAGE), store), jnp.zeros((blocks, KV, PAGE, D), store), *scales


def _written(quantized):
    """Two rows written through shuffled block tables, a third row with no blocks at all."""
    rng = np.random.default_rng(0)
    length = 10  # 3 blocks of 4: the last one partly filled
    tables = np.full((3, 4), UNALLOCATED, np.int32)
    tables[0, :3], tables[1, :3] = [5, 0, 3], [2, 6, 1]
    k = rng.standard_normal((3, length, KV, D)).astype(np.float32)
    v = rng.standard_normal((3, length, KV, D)).astype(np.float32)
    positions = np.broadcast_to(np.arange(length), (3, length))
    layer = PagedLayer(*_pool(8, quantized), jnp.asarray(tables)).write(jnp.asarray(k), jnp.asarray(v), positions)
    keys, values = layer.read(16, jnp.float32)
    return k, v, np.asarray(keys), np.asarray(values), layer


def test_a_paged_layer_reads_back_what_it_wrote_in_the_contiguous_layout():
    k, v, keys, values, layer = _written(quantized=False)
    # keys [B, KV, D, S] and values [B, KV, S, D], as KVCache lays them out (numpy transcription)
    np.testing.assert_array_equal(keys[:2, :, :, :10], k[:2].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(values[:2, :, :10], v[:2].transpose(0, 2, 1, 3))
    assert not keys[:, :, :, 10:].any() and not values[:, :, 10:].any()  # past the rows' writes
    assert not keys[2].any() and not values[2].any()  # a row without blocks reads zeros...
    used = np.zeros(8, bool)
    used[[5, 0, 3, 2, 6, 1]] = True
    assert not np.asarray(layer.k)[~used].any()  # ...and its writes went nowhere


def test_int8_kv_is_within_half_a_quantization_step_of_each_head():
    k, v, keys, values, _ = _written(quantized=True)
    for x, got in (
        (k[:2].transpose(0, 2, 3, 1), keys[:2, :, :, :10]),
        (v[:2].transpose(0, 2, 1, 3), values[:2, :, :10]),
    ):
        head_dim_axis = 2 if x.shape[2] == D else 3
        step = np.abs(x).max(axis=head_dim_axis, keepdims=True) / 127
        # rounding to the nearest code: |error| <= step / 2, plus fp32 rounding of code * scale
        assert np.all(np.abs(got - x) <= step / 2 * (1 + 1e-6) + 1e-7)
    codes, scale = quantize_int8(jnp.zeros((2, D)))
    assert not np.asarray(codes).any() and not np.asarray(scale).any()  # an all-zero head stays exact


@pytest.fixture(scope="module")
def adapter(tiny_model):
    return random_adapter(tiny_model.config, LoraConfig(rank=4), jax.random.PRNGKey(3), b_std=1.0, name="p")


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(10, 4000, n)] for n in lengths]


def _engine(model, **kv):
    return Engine(model.config, model.params, model.tokenizer, kv=KVSettings(**kv))


@pytest.fixture(scope="module")
def contiguous(tiny_model):
    return _engine(tiny_model, layout="contiguous")


def test_paged_greedy_equals_contiguous_with_adapters_and_chunked_prompts(tiny_model, contiguous, adapter):
    prompts = _prompts((5, 40, 70, 3))
    rows = [None, adapter, None, adapter]
    sampling = [SamplingParams(max_new_tokens=n) for n in (12, 9, 20, 6)]
    want = [c.tokens for c in contiguous.generate(prompts, sampling, adapters=rows)]
    assert want[1] != contiguous.generate(prompts[1:2], sampling[1])[0].tokens, "the adapter must matter"
    # 16 tokens a step: the 70-token prompt takes five chunks, interleaved with the others' decoding
    paged = _engine(tiny_model, layout="paged", step_tokens=16)
    assert [c.tokens for c in paged.generate(prompts, sampling, adapters=rows)] == want


def test_a_prefill_call_fills_its_padding_with_waiting_prompts(tiny_model, contiguous, monkeypatch):
    from afmkit.infer import engine as engine_module

    calls = []
    real = engine_module._paged_prefill

    def recording(params, cache, tables, tokens, *args, **kwargs):
        calls.append(np.asarray(tokens))
        return real(params, cache, tables, tokens, *args, **kwargs)

    monkeypatch.setattr(engine_module, "_paged_prefill", recording)
    prompts = _prompts([10] * 8, seed=2)  # tokens from 10 up: a zero is padding
    sampling = SamplingParams(max_new_tokens=6)
    want = [c.tokens for c in contiguous.generate(prompts, sampling)]
    paged = _engine(tiny_model, layout="paged", step_tokens=24)
    assert [c.tokens for c in paged.generate(prompts, sampling)] == want
    # The budget picks 10 + 10 + 4 tokens of three prompts, so the call is [4, 16] (powers of two);
    # its padding then takes the third prompt whole and the fourth: four whole prompts, not 2.4.
    assert calls[0].shape == (4, 16)
    assert [int((row != 0).sum()) for row in calls[0]] == [10, 10, 10, 10]
    assert sum(int((c != 0).sum()) for c in calls) == 80  # every prompt token once


def _collect(scheduler, request):
    events = queue.Queue()
    return scheduler.submit(request, events.put), events


def _drain(events):
    tokens = []
    while True:
        event = events.get(timeout=300)
        if isinstance(event, BaseException):
            raise event
        tokens.append(event.token)
        if event.finish_reason:
            return tokens


def test_rows_joining_a_paged_batch_mid_decode_match_running_alone(tiny_model, contiguous, adapter):
    engine = _engine(tiny_model, layout="paged", step_tokens=32)
    scheduler = Scheduler(engine, max_batch=4, capacity=257, adapter_slots=2, kv=engine.kv)
    try:
        prompts = _prompts((9, 100, 20, 60, 7), seed=1)
        lengths = [30, 10, 14, 8, 12]
        rows = [None, adapter, None, adapter, None]
        first = _collect(scheduler, Request(prompts[0], SamplingParams(max_new_tokens=lengths[0])))
        first_token = first[1].get(timeout=120).token  # decoding: the rest join a running batch
        later = [
            _collect(scheduler, Request(p, SamplingParams(max_new_tokens=n), a))
            for p, n, a in list(zip(prompts, lengths, rows))[1:]
        ]
        got = [[first_token, *_drain(first[1])]] + [_drain(events) for _, events in later]
        for i, tokens in enumerate(got):
            alone = contiguous.generate([prompts[i]], SamplingParams(max_new_tokens=lengths[i]), adapters=rows[i])[0]
            assert tokens == alone.tokens, i
        batch = scheduler.batch
        assert batch.active_rows == 0 and batch.reserved == 0
        assert len(batch.free_blocks) == batch.pool_blocks  # every block came back
    finally:
        scheduler.close()


@pytest.mark.parametrize("lazy", [True, False])
def test_cancelled_and_finished_rows_give_their_blocks_back_and_the_pool_shrinks_when_idle(
    tiny_model, lazy, monkeypatch
):
    """The lazy pool (CPU kernels) is made at its largest and remade when idle; the other starts
    at 1024 positions, grows and shrinks back."""
    if lazy and not kernels.on_cpu():
        pytest.skip("the lazy pool needs afmkit's CPU kernels")
    if not lazy:
        monkeypatch.setattr(kernels, "on_cpu", lambda: False)
    engine = _engine(tiny_model, layout="paged", page=16)
    batch = engine.new_batch(slots=4, capacity=1025)
    assert batch.lazy_pool == lazy
    start_blocks = batch.pool_blocks
    assert start_blocks == (4 * -(-1025 // 16) if lazy else 64)  # slots x row blocks, or 1024 positions
    prompts = _prompts((600, 600, 5), seed=2)
    requests = [Request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, (100, 100, 3))]
    batch.admit(requests)
    assert batch.reserved == 2 * -(-700 // 16) + 1  # each prompt plus max_new_tokens, in whole blocks
    while any(r.row.prefilled < len(r.prompt) for r in requests[:2]):
        batch.step()  # 256-token chunks; 1205 prompt positions need 77 blocks: the pool grows
    # grown a quarter beyond the 64 it started with, not doubled (the lazy pool never grows)
    assert batch.pool_blocks == (start_blocks if lazy else 80)
    assert len(requests[0].row.blocks) >= 600 // 16
    batch.cancel(requests[0])
    assert requests[0].row.blocks == [] and batch.reserved == -(-700 // 16) + (0 if requests[2].row.finished else 1)
    while batch.busy:
        batch.step()
    assert batch.reserved == 0 and batch.active_rows == 0
    assert batch.pool_blocks == start_blocks and len(batch.free_blocks) == start_blocks
    assert not batch.pool_written  # remade when idle: its written pages went back to the OS


def test_a_full_pool_makes_requests_wait_and_one_that_never_fits_is_refused(tiny_model, contiguous):
    engine = _engine(tiny_model, layout="paged", pool_tokens=64)
    scheduler = Scheduler(engine, max_batch=4, capacity=257, kv=engine.kv)
    try:
        prompts = _prompts((30, 25, 20), seed=3)
        # 30 + 20 = 50 tokens: 4 of the pool's 4 blocks; the next two must wait for it
        jobs = [_collect(scheduler, Request(p, SamplingParams(max_new_tokens=20))) for p in prompts]
        got = [_drain(events) for _, events in jobs]
        for prompt, tokens in zip(prompts, got):
            assert tokens == contiguous.generate([prompt], SamplingParams(max_new_tokens=20))[0].tokens
        with pytest.raises(UserError, match="exceed the KV pool \\(64 tokens\\)"):
            scheduler.submit(Request(_prompts((60,))[0], SamplingParams(max_new_tokens=10)), print)
    finally:
        scheduler.close()


def test_bad_kv_settings_are_one_line_errors(tiny_model):
    for settings, message in [
        (KVSettings(layout="ring"), "not one of: paged, contiguous"),
        (KVSettings(dtype="fp8"), "not one of: auto, int8"),
        (KVSettings(layout="contiguous", dtype="int8"), "needs the paged layout"),
        (KVSettings(page=24), "must divide 256"),
    ]:
        with pytest.raises(UserError, match=message):
            Engine(tiny_model.config, tiny_model.params, tiny_model.tokenizer, kv=settings)


def test_the_pool_grows_by_quarters_of_an_octave():
    # 1, 1.25, 1.5, 1.75 x a power of two: at most a quarter of a grown pool is beyond its need
    assert [pool_size(n) for n in (64, 65, 80, 81, 97, 113, 2049, 2561)] == [64, 80, 80, 96, 112, 128, 2560, 3072]
    for n in range(1, 5000):
        assert n <= pool_size(n) <= max(n, 1.25 * n)
