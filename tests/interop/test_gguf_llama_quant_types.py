"""afmkit reads the files llama.cpp's own quantizer writes (k-quants, i-quants and their fallback
types) as llama.cpp runs them: ``benchmarks/compression_table.py`` scores such files with
afmkit's perplexity code, so their weights must be dequantized right.

The reference is llama.cpp itself (llama-cpp-python, ``logits_all``) on the same file. llama.cpp
rounds more than afmkit does (activations to 8 bits inside quantized dot products, an f16 KV
cache), so the two never agree exactly; the bound comes from comparing sizes: that extra
rounding is about 2^-8 relative per value, while 2- to 4-bit weights move each weight by about
2^-2 to 2^-4 of its block's range. So afmkit on the quantized file must sit far closer to
llama.cpp on that file than afmkit's float model does: the RMS logit gap at most a quarter of
the quantization's own effect. A wrong block layout or scale (a misread type) gives a gap as
large as the effect or larger.
"""

import ctypes

import jax
import numpy as np
import pytest

import afmkit
from afmkit.config import get_size
from afmkit.interop.export import export_model
from afmkit.interop.gguf_types import tensor_types
from afmkit.model.transformer import init_params

llama_cpp = pytest.importorskip("llama_cpp")

# llama.cpp's types for the comparison table; rows of 256 values so every k-quant applies as is,
# plus the fallback types (Q5_0, IQ4_NL...) it picks for the rows it cannot split (checked below).
TYPES = ("Q4_K_M", "Q3_K_M", "IQ3_S", "Q2_K")


@pytest.fixture(scope="module")
def float_llama():
    config = get_size("smollm2-135m").replace(
        name="quant-llama", d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=768
    )
    params = init_params(config, jax.random.PRNGKey(3))
    # trained-model-like weights (not init's tiny ones) so the logits have structure to compare
    params = jax.tree.map(lambda w: w * 4.0 if w.ndim == 2 else w, params)
    tokenizer = afmkit.load("smollm2-135m-instruct", dtype="float32").tokenizer
    return afmkit.LanguageModel(config, params, tokenizer)


@pytest.fixture(scope="module")
def files(tmp_path_factory, float_llama):
    directory = tmp_path_factory.mktemp("quant")
    f32 = export_model(float_llama, directory / "f32.gguf", fmt="gguf", dtype="f32")
    out = {"F32": f32}
    for kind in TYPES:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        path = directory / f"{kind}.gguf"
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)) == 0
        out[kind] = path
    return out


def llama_cpp_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], np.float32)


def rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


@pytest.mark.slow
def test_llama_cpp_quantized_files_load_with_llama_cpps_logits(files, float_llama):
    ids = float_llama.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)[:48]
    float_logits = np.asarray(float_llama.logits(ids))
    # control: at f32 the only difference is llama.cpp's own rounding
    f32_gap = rms(afmkit.load(files["F32"], dtype="float32").logits(ids) - llama_cpp_logits(files["F32"], ids))
    kinds_seen = set()
    for kind in TYPES:
        theirs = llama_cpp_logits(files[kind], ids)
        ours = np.asarray(afmkit.load(files[kind], dtype="float32").logits(ids))
        effect = rms(float_logits - theirs)
        gap = rms(ours - theirs)
        assert gap <= 0.25 * effect, f"{kind}: afmkit vs llama.cpp {gap:.4f}, quantization effect {effect:.4f}"
        assert effect > 4 * f32_gap, f"{kind}: the quantization must show above llama.cpp's f32 rounding"
        kinds_seen |= {t for name, t in tensor_types(files[kind]).items() if name.startswith("blk.")}
    # the types the table's files hold (SmolLM2's 576-wide rows force the fallbacks there)
    assert {"Q4_K", "Q6_K", "Q3_K", "Q2_K", "IQ3_S"} <= kinds_seen, kinds_seen
