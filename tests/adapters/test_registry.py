"""The adapter registry: names not paths, LRU under a byte budget, transparent reloads."""

import shutil

import pytest

from afmkit.adapters.lora import LoraConfig
from afmkit.adapters.peft_io import WEIGHTS_FILE, save_adapter
from afmkit.adapters.registry import AdapterBudgetError, AdapterNotFoundError, AdapterRegistry
from afmkit.errors import CorruptFileError, UserError


@pytest.fixture
def adapter_dir(tiny_model, tmp_path, make_adapter):
    for i, name in enumerate(["a", "b", "c"]):
        adapter = make_adapter(tiny_model.config, LoraConfig(rank=4), seed=i, name=name)
        save_adapter(tmp_path / name, adapter, config=tiny_model.config, params=tiny_model.params)
    return tmp_path


def _registry(model, directory, budget):
    return AdapterRegistry(directory, config=model.config, params=model.params, budget_bytes=budget)


def test_lru_eviction_under_the_byte_budget_and_transparent_reload(tiny_model, adapter_dir):
    one = _registry(tiny_model, adapter_dir, 1 << 30).get("a").nbytes
    registry = _registry(tiny_model, adapter_dir, 2 * one)  # room for two
    a = registry.get("a")
    registry.get("b")
    assert registry.get("a") is a  # a hit, and now the most recent
    registry.get("c")  # evicts b, the least recently used
    assert registry.cached() == ["a", "c"]
    assert (registry.stats.hits, registry.stats.misses, registry.stats.evictions) == (1, 3, 1)
    assert registry.cached_bytes <= 2 * one
    b_again = registry.get("b")  # reloaded from disk, evicting a
    assert registry.cached() == ["c", "b"] and registry.stats.misses == 4
    # The request that held `a` still has a usable adapter after its eviction.
    assert a.weights[0]["wq"]["a"].shape == b_again.weights[0]["wq"]["a"].shape


def test_budget_smaller_than_one_adapter_is_a_clear_error(tiny_model, adapter_dir):
    registry = _registry(tiny_model, adapter_dir, 1000)
    with pytest.raises(AdapterBudgetError, match="cache-bytes"):
        registry.get("a")
    assert registry.cached() == []


@pytest.mark.parametrize("name", ["../a", "a/../../etc", "/etc/passwd", "..", ".hidden", "a b", "", "x" * 65])
def test_names_that_are_paths_are_refused(tiny_model, adapter_dir, name):
    registry = _registry(tiny_model, adapter_dir, 1 << 30)
    with pytest.raises(UserError, match="invalid adapter name"):
        registry.get(name)


def test_unknown_corrupt_and_unloaded_adapters(tiny_model, adapter_dir):
    registry = _registry(tiny_model, adapter_dir, 1 << 30)
    with pytest.raises(AdapterNotFoundError, match="available: a, b, c"):
        registry.get("nope")
    registry.get("a")
    assert registry.unload("a") and not registry.unload("a")
    shutil.copytree(adapter_dir / "b", adapter_dir / "broken")
    (adapter_dir / "broken" / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(CorruptFileError):
        registry.get("broken")
    assert registry.get("b").name == "b"  # others still load


def test_the_registry_alone_decides_how_long_an_adapter_stays_in_memory(tiny_model, adapter_dir):
    """Adapters are cached in one place, the registry's byte-bounded LRU: a decode batch's bank
    holds a device copy of each adapter it ran, never the adapter itself, so an idle adapter the
    registry evicts is freed (the host memory of cached adapters stays within the budget)."""
    import gc
    import weakref

    from afmkit.infer.engine import Request, cache_capacity
    from afmkit.infer.sampling import SamplingParams

    one = _registry(tiny_model, adapter_dir, 1 << 30).get("a").nbytes
    registry = _registry(tiny_model, adapter_dir, one)  # room for one adapter
    ids = tiny_model.tokenizer.encode("Adapters by name")
    batch = tiny_model.engine.new_batch(slots=2, capacity=cache_capacity(len(ids), 2), adapter_slots=3)

    def run(adapter):
        batch.admit([Request(ids, SamplingParams(max_new_tokens=2), adapter)])
        while batch.busy:
            batch.step()

    a = registry.get("a")
    run(a)  # a now sits idle in the bank
    gone = weakref.ref(a)
    del a
    run(registry.get("b"))  # the registry evicts a
    gc.collect()
    assert gone() is None
    assert registry.cached() == ["b"]
