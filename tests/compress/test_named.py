"""Named compressed models (``afmkit.compress.named``) on a small random model: the name resolves
everywhere a model name does, the first load builds and caches, later loads reuse the cache, a
damaged cache is rebuilt, builds are bit-identical (again, and with the numpy k-means), ``afmkit
info`` reports the stored bits, a shipped recovery adapter is applied, and a build that differs
from the reference is named in one line. The real SmolLM2 build is ``slow``."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afmkit
from afmkit import kernels
from afmkit.adapters.lora import LoraConfig, merge, random_adapter, single
from afmkit.adapters.peft_io import load_adapter, save_adapter
from afmkit.cli import EXIT_USER_ERROR, main
from afmkit.compress import kmeans, named
from afmkit.compress.palettize import bits_per_weight, checkpoint_bits
from afmkit.compress.settings import NamedCompressedSettings
from afmkit.config import get_size
from afmkit.errors import CorruptFileError, UserError
from afmkit.files import packaged_data
from afmkit.interop import native
from afmkit.lm import load_config
from afmkit.model.packed import dequantize_params
from afmkit.model.palettized import PalettizedWeight
from afmkit.model.transformer import init_params, logits_fn
from afmkit.weights import NAMED_ADAPTED, NAMED_COMPRESSED, known_models

REAL_NAME = "smollm2-135m-instruct-3.5bpw"
TEXT = packaged_data("tinyshakespeare/input_head.txt")
NAME = "micro-3bpw"
CONFIG = dataclasses.replace(
    get_size("afm-tiny"), name="afm-micro", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128
)


@pytest.fixture(scope="module")
def settings(smollm2, tmp_path_factory):
    """A named model over a small random float model, with its committed files made as the real
    one's are (``make_resources``: analysis, allocation, rank-1 Fisher factors)."""
    root = tmp_path_factory.mktemp("named")
    base = root / "float"
    native.save_checkpoint(base, CONFIG, init_params(CONFIG, jax.random.PRNGKey(3)), smollm2.tokenizer)
    made = NamedCompressedSettings(
        name=NAME,
        base=str(base),
        folder=str(root / "resources"),
        bits_per_weight=3.0,
        calibration_start=0,
        calibration_tokens=256,
        seq_len=64,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AFMKIT_CACHE", str(root / "analysis-cache"))
        named.make_resources(made, TEXT, made.folder, quiet=True)
    return made


@pytest.fixture(autouse=True)
def registered(settings, tmp_path, monkeypatch):
    """The small named model is known (as the real one is) and every test has its own cache."""
    monkeypatch.setitem(NAMED_COMPRESSED, NAME, settings)
    monkeypatch.setenv("AFMKIT_CACHE", str(tmp_path / "cache"))


def cached(settings):
    return named.cache_directory(settings)


def test_the_names_resolve(settings, capsys):
    assert REAL_NAME in known_models() and NAME in known_models()
    assert load_config(NAME) == load_config(settings.base)
    assert main(["generate", "--model", NAME, "--prompt", "To be", "--max-new-tokens", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["model"] == NAME and len(record["tokens"]) >= 1


def test_first_load_builds_and_caches_later_loads_reuse(settings, capsys, monkeypatch):
    model = afmkit.load(NAME)
    err = capsys.readouterr().err
    assert f"building {NAME}" in err  # the progress lines (piped: log lines, not a bar)
    assert model.name == NAME and model.adapter is None  # no recovery adapter ships here
    assert isinstance(model.params["layers"][0]["wq"], PalettizedWeight)
    assert "palettized" in repr(model)
    built = json.loads((cached(settings) / named.BUILD_FILE).read_text())
    assert built["bits_per_weight"] == bits_per_weight(model.params)

    def no_build(*args, **kwargs):
        raise AssertionError("the cached build was not reused")

    monkeypatch.setattr(named, "build", no_build)
    again = afmkit.load(NAME)
    assert "building" not in capsys.readouterr().err
    assert named.weight_digests(again.params) == named.weight_digests(model.params)


def _flip_a_weight_byte(directory):
    """Change one byte of the stored arrays (not the header): loads, but wrong."""
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    reader = native.SafetensorsReader(path)
    entry = reader.entries["layers.1.w_down.indices"]
    position = reader.data_start + entry["data_offsets"][0] + 5
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        _flip_a_weight_byte,
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
        lambda d: (d / named.BUILD_FILE).unlink(),  # a build killed before its digests were written
    ],
    ids=["flipped-byte", "truncated", "no-build-json"],
)
def test_a_damaged_cache_is_rebuilt(settings, capsys, damage):
    first = named.weight_digests(afmkit.load(NAME).params)
    damage(cached(settings))
    capsys.readouterr()
    model = afmkit.load(NAME)
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if f"rebuilding {NAME}: the cached copy is unusable" in line]) == 1
    assert named.weight_digests(model.params) == first


def test_two_builds_give_identical_bytes(settings, tmp_path):
    named.build(settings, tmp_path / "a", quiet=True)
    named.build(settings, tmp_path / "b", quiet=True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    a, b = (json.loads((tmp_path / d / named.BUILD_FILE).read_text()) for d in "ab")
    assert a["weights"] == b["weights"] and a["digest"] == b["digest"]


def test_native_and_numpy_kmeans_build_the_same_weights(settings, tmp_path, monkeypatch):
    if kmeans._library() is None:
        pytest.skip("no C++ compiler, or AFMKIT_KERNELS=0")
    native_build = named.build(settings, tmp_path / "native", quiet=True)
    monkeypatch.setattr(kmeans, "_library", lambda: None)  # what AFMKIT_KERNELS=0 or no compiler gives
    numpy_build = named.build(settings, tmp_path / "numpy", quiet=True)
    assert (native_build["kmeans"], numpy_build["kmeans"]) == ("native", "numpy")
    assert numpy_build["weights"] == native_build["weights"]


def test_native_and_numpy_kmeans_agree_to_the_bit():
    if kmeans._library() is None:
        pytest.skip("no C++ compiler, or AFMKIT_KERNELS=0")
    rng = np.random.default_rng(7)
    for k in (4, 8, 16):
        values = rng.standard_t(3, size=(4, 1500)).round(2)  # heavy tails, many repeated values
        for weights in (None, rng.exponential(size=values.shape)):
            native_result = kmeans.kmeans1d_groups(values, k, weights)
            library = kmeans._library
            try:
                kmeans._library = lambda: None
                numpy_result = kmeans.kmeans1d_groups(values, k, weights)
            finally:
                kmeans._library = library
            np.testing.assert_array_equal(native_result[0], numpy_result[0])
            np.testing.assert_array_equal(native_result[1], numpy_result[1])


def test_info_reports_the_stored_bits(settings, capsys):
    assert main(["info", NAME, "--json"]) == 0  # from the recipe, before any build
    reported = json.loads(capsys.readouterr().out)["bits_per_weight"]
    model = afmkit.load(NAME)
    assert reported["matrices"] == pytest.approx(bits_per_weight(model.params), rel=1e-12)
    assert reported["embedding"] == 9.0  # 8-bit codes plus an fp16 scale and offset per 32
    assert checkpoint_bits(cached(settings)) == pytest.approx(
        {k: reported[k] for k in ("matrices", "embedding", "all_weights")}, rel=1e-12
    )
    assert main(["info", str(cached(settings)), "--json"]) == 0  # a compressed directory reports them too
    assert json.loads(capsys.readouterr().out)["bits_per_weight"]["matrices"] == reported["matrices"]


def test_info_of_the_shipped_model_reports_3_5_bits(capsys):
    assert main(["info", REAL_NAME, "--json"]) == 0
    bits = json.loads(capsys.readouterr().out)["bits_per_weight"]
    assert 3.45 < bits["matrices"] <= 3.5 and bits["embedding"] == 9.0


def _ship_adapter(settings, model):
    adapter = random_adapter(model.config, LoraConfig(rank=4), jax.random.PRNGKey(1), b_std=0.05)
    save_adapter(named.resource_dir(settings) / "recovery", adapter, config=model.config, params=model.params)


def test_a_shipped_recovery_adapter_is_applied(settings):
    bare = afmkit.load(NAME)
    _ship_adapter(settings, bare)
    try:
        model = afmkit.load(NAME)
        assert model.adapter is not None and model.name == NAME
        assert afmkit.load(NAME, recovery=False).adapter is None
        tokens = model.tokenizer.encode("To be, or not to be")
        assert not np.allclose(model.logits(tokens), bare.logits(tokens))
    finally:
        shutil.rmtree(named.resource_dir(settings) / "recovery")


def test_an_adapter_of_the_float_model_adds_to_the_recovery_adapter(settings, tmp_path, monkeypatch):
    """A named adapted model over the compressed name (as ``smollm2-135m-afm-3.5bpw``): the
    packaged adapter, trained on the float model, runs on the build together with the recovery
    adapter. Checked against another path: the build expanded to fp32 with both updates merged
    into its matrices."""
    bare = afmkit.load(NAME)
    _ship_adapter(settings, bare)
    float_model = afmkit.load(settings.base)
    task = random_adapter(float_model.config, LoraConfig(rank=8), jax.random.PRNGKey(2), b_std=0.05)
    save_adapter(tmp_path / "task", task, config=float_model.config, params=float_model.params)
    monkeypatch.setitem(NAMED_ADAPTED, "micro-task-3bpw", (NAME, str(tmp_path / "task")))
    try:
        model, off = afmkit.load("micro-task-3bpw"), afmkit.load("micro-task-3bpw", recovery=False)
        recovery = afmkit.load(NAME).adapter
    finally:
        shutil.rmtree(named.resource_dir(settings) / "recovery")
    assert model.name == "micro-task-3bpw" and model.adapter.config.rank == 4 + 8
    # The kernels in fp32 (their bf16 rounding is bounded by the kernel tests), so both sides hold
    # the same fp32 weights and differ by summation order only; a new function, so traced afresh.
    monkeypatch.setattr(kernels, "has_bf16", lambda: False)
    fp32_logits = jax.jit(lambda params, tokens, adapters: logits_fn(params, tokens, config=CONFIG, adapters=adapters))
    tokens = jnp.asarray([model.tokenizer.encode("To be, or not to be")])
    plain = dequantize_params(bare.params)

    def merged(*adapters):
        params = plain
        for adapter in adapters:
            params = merge(params, adapter)
        return np.asarray(fp32_logits(params, tokens, None))

    both, task_only = merged(recovery, task), merged(task)
    # As in tests/model/test_palettized.py: each matmul within K * 2^-24 of its sum of |x w|, a
    # relative 2^-17 that two layers grow a few times; 2^-12 of the largest logit bounds it.
    slack = 2.0**-12 * np.abs(both).max()
    assert np.abs(np.asarray(fp32_logits(model.params, tokens, single(model.adapter))) - both).max() <= slack
    assert np.abs(np.asarray(fp32_logits(off.params, tokens, single(off.adapter))) - task_only).max() <= slack
    for alone in (merged(recovery), task_only):  # neither update alone is what loads
        assert np.abs(both - alone).max() > 100 * slack


def test_a_recovery_adapter_trained_on_the_name_ships_and_applies(settings, tmp_path):
    """The maintainer's steps (the resource README): recover on the named build, ship the run
    into the folder's recovery/, and every load applies it."""
    out = tmp_path / "run" / "recovery"
    _recover(settings, out)
    shipped = named.ship_recovery(settings, out)
    assert not (shipped / named.TABLES_FILE).exists()
    try:
        model = afmkit.load(NAME)
        assert model.adapter is not None and afmkit.load(NAME, recovery=False).adapter is None
    finally:
        shutil.rmtree(shipped)


def test_recovery_can_continue_the_adapter_the_model_loads_with(settings, tmp_path, capsys):
    """``--init-from-recovery`` starts from the shipped adapter (its rank, not --rank): at a learning
    rate of 1e-6 the run saves that adapter back within one fp16 step (Adam moves a weight by about
    the learning rate a step: 2e-6 in two steps, under the fp16 spacing of these weights), where a new
    adapter would have B = 0. It needs --train lora, and an adapter to continue; each refusal is
    one line."""
    bare = afmkit.load(NAME)
    _ship_adapter(settings, bare)
    try:
        out = tmp_path / "continued"
        _recover(settings, out, "--init-from-recovery", "--lr", "1e-6")
        shipped = load_adapter(named.resource_dir(settings) / "recovery", config=bare.config, params=bare.params)
    finally:
        shutil.rmtree(named.resource_dir(settings) / "recovery")
    continued = load_adapter(out, config=bare.config, params=bare.params)
    assert continued.config.rank == shipped.config.rank == 4
    for a, b in zip(continued.weights, shipped.weights):
        assert a.keys() == b.keys()
        for w in a:
            for part in ("a", "b"):
                expected = np.asarray(b[w][part], np.float32)
                np.testing.assert_allclose(np.asarray(a[w][part], np.float32), expected, rtol=2.0**-10, atol=1e-5)
    argv = ["compress", "recover", "--model", NAME, "--data", str(TEXT), "--init-from-recovery", "--quiet"]
    assert main([*argv, "--train", "both", "--out", str(tmp_path / "x")]) == EXIT_USER_ERROR
    assert "--train lora" in capsys.readouterr().err
    # no recovery adapter ships any more: nothing to continue
    assert main([*argv, "--teacher", settings.base, "--out", str(tmp_path / "y")]) == EXIT_USER_ERROR
    assert "no adapter to continue" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_recipe_trains_over_the_compressed_weights_from_their_recovery_adapter(settings, tmp_path):
    """``posttrain sft --model NAME`` trains over the build as stored (its recovery adapter off, not
    silently dropped under a new one), and ``--init-adapter NAME's recovery`` continues it: the
    adapter's fingerprint is the build's, so it fits."""
    bare = afmkit.load(NAME)
    _ship_adapter(settings, bare)
    recovery = named.resource_dir(settings) / "recovery"
    chats = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there, friend."}]
    chats.write_text(2 * (json.dumps({"messages": chat}) + "\n"))
    argv = ["posttrain", "sft", "--model", NAME, "--data", str(chats), "--out", str(tmp_path / "sft"), "--quiet"]
    argv += [
        "--init-adapter",
        str(recovery),
        "--steps",
        "1",
        "--batch",
        "1",
        "--seq-len",
        "64",
        "--eval-fraction",
        "0.5",
    ]
    try:
        assert main(argv) == 0
    finally:
        shutil.rmtree(recovery)
    assert load_adapter(tmp_path / "sft", config=bare.config, params=bare.params).config.rank == 4


def _recover(settings, out, *extra):
    argv = ["compress", "recover", "--model", NAME, "--teacher", settings.base, "--data", TEXT, "--out", out]
    argv += ["--steps", "2", "--batch", "1", "--seq-len", "64", "--eval-rows", "1", "--top-k", "8", "--quiet", *extra]
    assert main([str(a) for a in argv]) == 0


def test_trained_tables_ship_with_the_adapter_and_apply_with_recovery(settings, tmp_path, capsys):
    """``--train both`` on the name, then ``ship-recovery``: every load with recovery is the run's
    own model (its tables, scales and adapter); ``recovery=False`` is the k-means build as cached."""
    run = tmp_path / "run"
    _recover(settings, run, "--train", "both", "--lr", "1e-2")
    assert named.main(["ship-recovery", str(run), NAME]) == 0
    shipped = named.resource_dir(settings) / "recovery"
    try:
        model, trained, bare = afmkit.load(NAME), afmkit.load(run), afmkit.load(NAME, recovery=False)
        tables, built = named.table_arrays(model.params), named.table_arrays(bare.params)
        assert tables.keys() == named.table_arrays(trained.params).keys() == built.keys()
        assert all(np.array_equal(tables[k], named.table_arrays(trained.params)[k]) for k in tables)
        assert any(not np.array_equal(tables[k], built[k]) for k in tables)  # the tables did train
        assert (
            named.weight_digests(bare.params)
            == json.loads((cached(settings) / named.BUILD_FILE).read_text())["weights"]
        )
        tokens = model.tokenizer.encode("To be, or not to be")
        np.testing.assert_array_equal(model.logits(tokens), trained.logits(tokens))
        assert model.adapter is not None and bare.adapter is None
        capsys.readouterr()
        assert main(["info", NAME, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)["bits_per_weight"]
        assert info["recovery_tables"] and info["recovery_adapter"]
    finally:
        shutil.rmtree(shipped)


def test_tables_that_fit_another_build_are_refused_in_one_line(settings, tmp_path):
    from safetensors.numpy import save_file

    tables = named.table_arrays(afmkit.load(NAME).params)
    key = next(iter(tables))
    tables[key] = tables[key][:-1]  # a table too few: another build's
    shipped = named.resource_dir(settings) / "recovery"
    shipped.mkdir()
    save_file(tables, str(shipped / named.TABLES_FILE))
    try:
        with pytest.raises(CorruptFileError) as refused:
            afmkit.load(NAME)
        assert "\n" not in str(refused.value) and key in str(refused.value) and "another build" in str(refused.value)
        assert afmkit.load(NAME, recovery=False).adapter is None  # the build itself still loads
    finally:
        shutil.rmtree(shipped)


def test_the_maintainer_steps_name_an_unknown_model_in_one_line(capsys):
    assert named.main(["ship-recovery", "run", "no-such-model"]) == 2
    assert capsys.readouterr().err.strip() == "afmkit: error: 'no-such-model' is no named compressed model " + (
        f"({', '.join(NAMED_COMPRESSED)})"
    )


def test_a_run_on_other_indices_is_not_shipped(settings, tmp_path):
    """Only the tables and scales may differ from the build: a run whose indices differ (made on
    another build) is refused in one line, and what ships stays as it was."""
    run = tmp_path / "run"
    _recover(settings, run, "--train", "tables")
    config, params, tokenizer = native.load_checkpoint(run)
    leaf = params["layers"][1]["w_up"]
    indices = np.asarray(leaf.indices).copy()
    indices.flat[0] ^= 1
    params["layers"][1]["w_up"] = dataclasses.replace(leaf, indices=indices)
    other = tmp_path / "other"
    native.save_checkpoint(other, config, params, tokenizer)
    with pytest.raises(UserError) as refused:
        named.ship_recovery(settings, other, quiet=True)
    assert "\n" not in str(refused.value) and "layers.1.w_up" in str(refused.value)
    assert not (named.resource_dir(settings) / "recovery").exists()


def test_a_build_unlike_the_reference_is_named_in_one_line(settings, capsys):
    model = afmkit.load(NAME)
    reference = json.loads((cached(settings) / named.BUILD_FILE).read_text())
    reference["weights"]["layers.0.wk"] = "0" * 16  # as if the reference had been built otherwise
    path = named.resource_dir(settings) / named.BUILD_FILE
    path.write_text(json.dumps(reference))
    _ship_adapter(settings, model)
    try:
        with pytest.raises(UserError) as refused:
            afmkit.load(NAME)
        message = str(refused.value)
        assert "\n" not in message and "differ from the reference build in 1 of" in message
        assert "layers.0.wk" in message and "recovery=False" in message
        capsys.readouterr()
        assert afmkit.load(NAME, recovery=False).adapter is None  # loads, with a warning
        assert "warning" in capsys.readouterr().err
    finally:
        path.unlink()
        shutil.rmtree(named.resource_dir(settings) / "recovery")


def test_other_float_weights_are_refused_in_one_line(settings, tmp_path, monkeypatch, smollm2, capsys):
    other = tmp_path / "other"
    native.save_checkpoint(other, CONFIG, init_params(CONFIG, jax.random.PRNGKey(4)), smollm2.tokenizer)
    monkeypatch.setitem(NAMED_COMPRESSED, NAME, dataclasses.replace(settings, base=str(other)))
    assert main(["generate", "--model", NAME, "--prompt", "x", "--max-new-tokens", "1", "--json"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("afmkit: error:") and "fingerprint" in err


@pytest.mark.slow
def test_the_shipped_model_builds_as_its_reference(tmp_path, monkeypatch):
    """The real build (minutes): the committed recipe and importance give the reference's bits."""
    monkeypatch.setenv("AFMKIT_CACHE", str(tmp_path / "cache"))
    settings = NAMED_COMPRESSED[REAL_NAME]
    model = afmkit.load(REAL_NAME, recovery=False)
    reference = json.loads((named.resource_dir(settings) / named.BUILD_FILE).read_text())
    assert named.weight_digests(model.params) == reference["weights"]
    assert 3.45 < bits_per_weight(model.params) <= 3.5
