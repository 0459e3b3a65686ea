"""A long-lived engine keeps XLA's compiled code under the kernel's memory-mapping limit: each new
batch bucket maps hundreds of pages of code, and past ``vm.max_map_count`` the next compile
segfaults (docs/serving.md, "Faults and shutdown"). The limit is lowered here so a few buckets reach it."""

import jax
import pytest

from afmkit import runtime
from afmkit.infer.engine import Engine
from afmkit.infer.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)
BATCH_SIZES = (1, 2, 3, 5, 8)  # five batch buckets: five sets of new programs


def _prompts(n: int) -> list[list[int]]:
    return [[1 + (7 * i + j) % 500 for j in range(3 + 4 * i)] for i in range(n)]


def _run(engine: Engine) -> tuple[list[list[list[int]]], list[int]]:
    outputs, mappings = [], []
    for n in BATCH_SIZES:
        outputs.append([c.tokens for c in engine.generate(_prompts(n), GREEDY)])
        mappings.append(runtime.memory_mappings())
    return outputs, mappings


@pytest.mark.skipif(not runtime.memory_mappings(), reason="counts mappings in /proc/self/maps (Linux)")
def test_new_buckets_drop_compiled_code_near_the_limit_and_answers_stay_the_same(tiny_model, monkeypatch, capsys):
    engine = Engine(tiny_model.config, tiny_model.params, tiny_model.tokenizer)
    jax.clear_caches()
    start = runtime.memory_mappings()
    expected, unguarded = _run(engine)  # the real limit is far away: nothing is dropped
    assert "dropped compiled programs" not in capsys.readouterr().err
    growth = [b - a for a, b in zip([start, *unguarded], unguarded)]
    assert min(growth) > 0, growth  # every bucket mapped new code

    jax.clear_caches()
    start = runtime.memory_mappings()
    limit = 2 * (start + max(growth))  # the engine drops at half the limit: after a bucket or two
    monkeypatch.setattr(runtime, "map_limit", lambda: limit)
    got, guarded = _run(engine)
    assert got == expected  # programs compiled again give the same tokens
    assert capsys.readouterr().err.count("dropped compiled programs") >= 2
    # Held under half the limit plus what one generate (its prefill and decode buckets) adds.
    assert max(guarded) <= limit // 2 + max(growth), (guarded, limit)
    assert guarded[-1] < unguarded[-1]
