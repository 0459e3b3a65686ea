"""Continuous batching with per-row adapters: requests that join a running batch at different
times, under different adapters, get exactly the tokens they get alone."""

import queue
import threading

import jax
import pytest

from afmkit.adapters.lora import LoraConfig, merge, random_adapter
from afmkit.infer.engine import Engine, Request
from afmkit.infer.sampling import SamplingParams
from afmkit.infer.scheduler import Scheduler


def trained_like(config, lora, seed, *, name, std):
    return random_adapter(config, lora, jax.random.PRNGKey(seed), b_std=std, name=name)


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model):
    config = tiny_model.config
    return [
        trained_like(config, LoraConfig(rank=8), seed=1, name="a", std=1.0),
        trained_like(config, LoraConfig(rank=8, targets=("q", "v", "down")), seed=2, name="b", std=1.0),
        trained_like(config, LoraConfig(rank=4, layers=(1, 2)), seed=3, name="c", std=1.0),
    ]


def _prompts(n):
    return [[(17 * i + 5 * j) % 4000 + 10 for j in range(5 + 3 * i)] for i in range(n)]


def test_generate_with_per_row_adapters_matches_each_alone_and_merged(tiny_model, tiny_adapters):
    engine = tiny_model.engine
    prompts = _prompts(5)
    adapters = [tiny_adapters[0], None, tiny_adapters[1], tiny_adapters[2], tiny_adapters[0]]
    sampling = SamplingParams(max_new_tokens=10)
    mixed = engine.generate(prompts, sampling, adapters=adapters)
    base = engine.generate(prompts, sampling)
    assert any(m.tokens != b.tokens for m, b in zip(mixed, base))  # the adapters matter
    for prompt, adapter, out in zip(prompts, adapters, mixed):
        alone = engine.generate([prompt], sampling, adapters=adapter)[0]
        assert out.tokens == alone.tokens
        if adapter is not None:
            merged = Engine(tiny_model.config, merge(tiny_model.params, adapter), tiny_model.tokenizer)
            assert merged.generate([prompt], sampling)[0].tokens == out.tokens


def test_rows_sharing_one_adapter_read_it_in_place_and_match_each_alone(tiny_model, tiny_adapters):
    """A step whose rows all use one adapter takes that adapter itself, converted once to the
    activations' dtype, instead of gathering a copy per row from the bank (which took 39-54% of a
    one-stream decode step: docs/compression.md); mixed steps still gather. Same tokens either way."""
    from afmkit.adapters.lora import RowAdapters, SingleAdapter

    engine = tiny_model.engine
    prompts, sampling = _prompts(3), SamplingParams(max_new_tokens=10)
    shared = engine.generate(prompts, sampling, adapters=tiny_adapters[0])
    merged = Engine(tiny_model.config, merge(tiny_model.params, tiny_adapters[0]), tiny_model.tokenizer)
    for prompt, out in zip(prompts, shared):
        assert out.tokens == merged.generate([prompt], sampling)[0].tokens
        mixed = engine.generate([prompt, prompts[0]], sampling, adapters=[tiny_adapters[0], tiny_adapters[1]])
        assert mixed[0].tokens == out.tokens

    batch = engine.new_batch(slots=4, capacity=64, adapter_slots=3)
    a, b = batch._reserve_bank_slot(tiny_adapters[0]), batch._reserve_bank_slot(tiny_adapters[1])
    uniform = batch._step_adapters([a, a], [a, a, 0, 0])
    assert isinstance(uniform, SingleAdapter)
    assert all(leaf.dtype == engine.activation_dtype for leaf in jax.tree.leaves(uniform.weights))
    assert batch._step_adapters([a], [a, 0, 0, 0]) is uniform  # converted once, not per step
    assert isinstance(batch._step_adapters([a, b], [a, b, 0, 0]), RowAdapters)
    assert isinstance(batch._step_adapters([a, 0], [a, 0, 0, 0]), RowAdapters)  # a bare row keeps the bank
    assert batch._step_adapters([0, 0], [0, 0, 0, 0]) is None


def _collect(scheduler, request):
    events = queue.Queue()
    job = scheduler.submit(request, events.put)
    return job, events


def _drain(events, timeout=120):
    tokens = []
    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, BaseException):
            raise event
        tokens.append(event.token)
        if event.finish_reason:
            return tokens, event.finish_reason


def test_requests_joining_a_running_batch_match_running_alone(tiny_model, tiny_adapters):
    engine = Engine(tiny_model.config, tiny_model.params, tiny_model.tokenizer)
    scheduler = Scheduler(engine, max_batch=4, capacity=257, adapter_slots=3)  # fewer bank slots than adapters
    try:
        prompts = _prompts(7)
        adapters = [None, *tiny_adapters, tiny_adapters[1], None, tiny_adapters[2]]
        lengths = [30, 12, 25, 8, 20, 16, 9]
        # The first two start a batch; the rest arrive while it runs (more than the 4 slots).
        first = [
            _collect(scheduler, Request(p, SamplingParams(max_new_tokens=n), a))
            for p, n, a in list(zip(prompts, lengths, adapters))[:2]
        ]
        _, events0 = first[0]
        events0.get(timeout=120)  # the batch is running
        later = [
            _collect(scheduler, Request(p, SamplingParams(max_new_tokens=n), a))
            for p, n, a in list(zip(prompts, lengths, adapters))[2:]
        ]
        results = [_drain(ev) for _, ev in first[1:]] + [_drain(ev) for _, ev in later]
        for i, (tokens, reason) in enumerate(results, start=1):
            alone = engine.generate([prompts[i]], SamplingParams(max_new_tokens=lengths[i]), adapters=adapters[i])[0]
            assert tokens == alone.tokens, i
            assert reason == alone.finish_reason
        assert scheduler.batch.active_rows == 0
        assert scheduler.stats.completed == 7
    finally:
        scheduler.close()


def test_a_cancelled_request_frees_its_slot_and_others_finish(tiny_model):
    engine = Engine(tiny_model.config, tiny_model.params, tiny_model.tokenizer)
    scheduler = Scheduler(engine, max_batch=2, capacity=257, adapter_slots=0)
    try:
        prompts = _prompts(3)
        long_job, long_events = _collect(scheduler, Request(prompts[0], SamplingParams(max_new_tokens=200)))
        _, short_events = _collect(scheduler, Request(prompts[1], SamplingParams(max_new_tokens=5)))
        long_events.get(timeout=120)
        long_job.cancel()
        # The third request needs the cancelled request's slot (only 2 slots).
        _, third_events = _collect(scheduler, Request(prompts[2], SamplingParams(max_new_tokens=6)))
        assert len(_drain(short_events)[0]) == 5
        assert len(_drain(third_events)[0]) == 6
        assert scheduler.stats.cancelled == 1 and scheduler.batch.active_rows == 0
    finally:
        scheduler.close()


@pytest.mark.slow
def test_many_threads_submitting_at_once(tiny_model, tiny_adapters):
    engine = Engine(tiny_model.config, tiny_model.params, tiny_model.tokenizer)
    scheduler = Scheduler(engine, max_batch=8, capacity=257, adapter_slots=4)
    try:
        prompts = _prompts(12)
        results = {}

        def client(i):
            adapter = tiny_adapters[i % 3] if i % 4 else None
            _, events = _collect(scheduler, Request(prompts[i], SamplingParams(max_new_tokens=6 + i % 5), adapter))
            results[i] = (_drain(events)[0], adapter)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(results) == 12
        for i, (tokens, adapter) in results.items():
            alone = engine.generate([prompts[i]], SamplingParams(max_new_tokens=6 + i % 5), adapters=adapter)[0]
            assert tokens == alone.tokens
    finally:
        scheduler.close()
