"""The engine on a device mesh: weights split by the trainer's rule table, the KV cache by rows
and KV heads, on the 8 simulated CPU devices tests/conftest.py sets up. A sharded step computes
what the unsharded one does up to the order of fp32 sums (~1e-7 relative), far below the gap
between a greedy token and the runner-up on these prompts, so the greedy tokens must be equal."""

import jax
import numpy as np
import pytest

import afmkit
from afmkit.adapters.lora import LoraConfig, random_adapter
from afmkit.config import get_size
from afmkit.errors import ModelNotFoundError, UserError
from afmkit.infer.engine import Engine, KVSettings, Request
from afmkit.infer.sampling import SamplingParams
from afmkit.model.transformer import init_params
from afmkit.sharding.mesh import make_mesh

CONFIG = get_size("test-tiny")  # 4 heads, 2 KV heads, d_ff 192, vocab 512
GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny(smollm2):
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    return afmkit.LanguageModel(CONFIG, params, smollm2.tokenizer, name="test-tiny-random")


def _prompts(seed=0, lengths=(5, 17, 9)):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, CONFIG.vocab_size, n)] for n in lengths]


def _engine(model, mesh=None):
    return Engine(model.config, model.params, model.tokenizer, eos_ids=model.tokenizer.stop_ids, mesh=mesh)


def _tokens(engine, prompts, adapters=None):
    return [c.tokens for c in engine.generate(prompts, GREEDY, adapters=adapters)]


def test_sharded_greedy_tokens_equal_unsharded_with_and_without_adapters(tiny):
    prompts = _prompts()
    adapter = random_adapter(CONFIG, LoraConfig(rank=4), jax.random.PRNGKey(1), b_std=0.5)
    rows = [None, adapter, None]  # one LoRA row among base rows
    single = _engine(tiny)
    want, want_adapted = _tokens(single, prompts), _tokens(single, prompts, rows)
    assert want_adapted[1] != want[1], "the adapter must change its row, or the check below proves nothing"
    engine = _engine(tiny, "data=2,fsdp=2,tensor=2")
    wq = engine.params["layers"][0]["wq"]  # [embed, heads, head_dim]: embed over fsdp, heads over tensor
    assert wq.addressable_shards[0].data.shape == (CONFIG.d_model // 2, CONFIG.n_heads // 2, CONFIG.head_dim)
    assert _tokens(engine, prompts) == want
    assert _tokens(engine, prompts, rows) == want_adapted


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_continuous_batch_on_a_mesh_matches_unsharded(tiny, layout):
    """The server's path: rows join a running batch at free slots (gathered prefill) mid-decode."""

    def run(engine):
        batch = engine.new_batch(slots=4, capacity=256, adapter_slots=2, kv=KVSettings(layout=layout))
        first, second = (Request(p, GREEDY, index=i) for i, p in enumerate(_prompts(seed=2, lengths=(7, 11))))
        tokens = {0: [], 1: []}
        for _, event in batch.admit([first])[1]:
            tokens[event.index].append(event.token)
        for _ in range(3):
            for _, event in batch.step():
                tokens[event.index].append(event.token)
        for _, event in batch.admit([second])[1]:
            tokens[event.index].append(event.token)
        while batch.busy:
            for _, event in batch.step():
                tokens[event.index].append(event.token)
        return tokens, batch.cache.k[0]

    want, _ = run(_engine(tiny))
    got, keys = run(_engine(tiny, "data=4,tensor=2"))
    assert got == want
    if layout == "contiguous":
        # keys [rows, kv_heads, head_dim, capacity]: each device holds a quarter of the rows, half the KV heads
        assert keys.addressable_shards[0].data.shape[:2] == (4 // 4, CONFIG.n_kv_heads // 2)
    else:  # a block pool [blocks, kv_heads, head_dim, page]: every block on every device, half the KV heads
        assert keys.addressable_shards[0].data.shape[:2] == (keys.shape[0], CONFIG.n_kv_heads // 2)


@pytest.mark.slow  # ~50-80 s on 2 shared cores: compiling SmolLM2 for 6 simulated devices
def test_smollm2_on_a_data_and_tensor_mesh_matches_unsharded(smollm2):
    """SmolLM2 (9 heads, 3 KV heads) splits 3 ways over tensor, on 6 of the 8 devices."""
    prompts = [
        smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template([{"role": "user", "content": q}]))
        for q in ("What is the capital of France?", "List three prime numbers.")
    ]
    mesh = make_mesh("data=2,tensor=3", devices=jax.devices()[:6])
    assert _tokens(_engine(smollm2, mesh), prompts) == _tokens(smollm2.engine, prompts)


@pytest.fixture(scope="module")
def tiny_on_mesh(tiny, tmp_path_factory):
    directory = tiny.save(tmp_path_factory.mktemp("tiny") / "tiny")
    return afmkit.load(directory, mesh="tensor=2,data=-1")


def test_load_with_a_mesh_spec(tiny, tiny_on_mesh):
    model = tiny_on_mesh
    assert dict(model.engine.mesh.shape)["tensor"] == 2
    prompts = _prompts(seed=3)
    assert _tokens(model.engine, prompts) == _tokens(_engine(tiny), prompts)
    # scoring runs on the same split weights
    np.testing.assert_allclose(model.logits(prompts[0]), tiny.logits(prompts[0]), rtol=1e-4, atol=1e-4)


def test_a_mesh_that_cannot_split_the_model_names_the_weight_and_the_axis(tiny):
    with pytest.raises(UserError) as error:
        _engine(tiny, "data=2,tensor=4")  # 2 KV heads cannot be split 4 ways
    message = str(error.value)
    assert "\n" not in message
    assert "layers/0/wk" in message and "'kv_heads'" in message and "tensor=4" in message


def test_packed_weights_and_bad_specs_are_refused_before_loading():
    missing = "/nonexistent/model.gguf"  # loading it would be a ModelNotFoundError
    with pytest.raises(UserError, match=r"int4.*single-device.*float32 or bfloat16") as error:
        afmkit.load(missing, dtype="int4", mesh="tensor=2,data=4")
    assert not isinstance(error.value, ModelNotFoundError)
    with pytest.raises(UserError, match="needs 3 devices but 8 are available"):
        afmkit.load(missing, mesh="tensor=3")


def test_serve_checks_its_mesh_before_loading_the_model():
    import argparse

    from afmkit.infer.serve_settings import add_serve_arguments
    from afmkit.infer.server import cmd_serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="/nonexistent/model.gguf")
    parser.add_argument("--dtype")
    add_serve_arguments(parser)
    with pytest.raises(UserError, match="bad mesh spec 'tensors=2'"):
        cmd_serve(parser.parse_args(["--mesh", "tensors=2", "--port", "0"]))
    with pytest.raises(UserError, match=r"--max-batch 12 does not split over mesh 'data=8'.*multiple of 8"):
        cmd_serve(parser.parse_args(["--mesh", "data=8", "--max-batch", "12", "--port", "0"]))


def test_server_on_a_mesh_answers_as_unsharded_over_http(tiny_model, live_server, tmp_path):
    """Base and adapter requests in flight together, over HTTP, against the unsharded engine
    (afm-tiny: random weights with SmolLM2's vocabulary, so chat text tokenizes into it)."""
    import concurrent.futures

    import httpx

    from afmkit.adapters.peft_io import save_adapter
    from afmkit.infer.server import create_app

    tiny = tiny_model
    adapter = random_adapter(tiny.config, LoraConfig(rank=4), jax.random.PRNGKey(5), b_std=0.5, name="alpha")
    save_adapter(tmp_path / "adapters" / "alpha", adapter, config=tiny.config, params=tiny.params)
    on_mesh = afmkit.load(tiny.save(tmp_path / "model"), mesh="tensor=2,data=-1")
    server = live_server(create_app(on_mesh, served_name="tiny", adapters_dir=str(tmp_path / "adapters"), max_batch=4))
    messages = [{"role": "user", "content": "Summarize: the cat sat on the mat."}]

    def ask(model):
        body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0}
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        base, adapted = pool.map(ask, ["tiny", "tiny:alpha"])
    ids = tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(messages))
    sampling = SamplingParams(max_new_tokens=8)
    want_base, want_adapted = (_engine(tiny).generate([ids], sampling, adapters=a)[0].text for a in (None, adapter))
    assert want_adapted != want_base
    assert (base, adapted) == (want_base, want_adapted)
