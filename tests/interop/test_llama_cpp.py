"""SmolLM2 exported to GGUF runs in llama.cpp (through llama-cpp-python) with afmkit's greedy
tokens on the same weights, at f32 and q8_0. Slow (SmolLM2 is exported, loaded and run several
times) and skipped where ``llama_cpp`` is not installed (``pip install llama-cpp-python``).

llama.cpp's arithmetic rounds more than afmkit's: its KV cache is f16, and in q8_0 dot products
it rounds the activations to Q8_0 too. A greedy choice may therefore flip only where afmkit's
top two logits are closer than that extra rounding can move them. Its size is measured, not
assumed: the same format's rounding applied to the weights instead (f16, resp. Q8_0) moves
afmkit's logits by at most ``delta`` at each position; the margin allowed is ``2 * delta`` (both
competing logits can move). llama.cpp's tokens are fed back to afmkit (teacher forcing), so one
flip does not excuse the rest of the sequence.
"""

import jax
import numpy as np
import pytest

import afmkit
from afmkit.interop.export import export_model
from afmkit.interop.huggingface import params_from_hf_tensors, params_to_hf_tensors

llama_cpp = pytest.importorskip("llama_cpp")

NEW_TOKENS = 32
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers larger than 100."}],
]
# The rounding llama.cpp adds on top of the file's weights, per exported dtype.
EXTRA_ROUNDING = {"f32": "F16", "q8_0": "Q8_0"}


@pytest.fixture(scope="module")
def smollm2_f32():
    return afmkit.load("smollm2-135m-instruct", dtype="float32")


def weights_rounded(model, qtype_name):
    """``model`` with every matrix rounded to a GGUF type by the gguf package (norms kept)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[qtype_name]
    hf = {
        name: (dequantize(quantize(w, qtype), qtype) if w.ndim == 2 else w)
        for name, w in params_to_hf_tensors(model.config, jax.tree.map(np.asarray, model.params))
    }
    return afmkit.LanguageModel(model.config, params_from_hf_tensors(model.config, hf.__getitem__), model.tokenizer)


def llama_cpp_greedy(llm, prompt_ids, eos_ids):
    out = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if token in eos_ids or len(out) == NEW_TOKENS:
            break
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_llama_cpp_generates_afmkits_greedy_tokens(tmp_path, smollm2_f32, dtype):
    path = export_model(smollm2_f32, tmp_path / f"smollm2-{dtype}.gguf", fmt="gguf", dtype=dtype)
    ours = afmkit.load(path, dtype="float32")  # the file's weights, dequantized exactly
    perturbed = weights_rounded(smollm2_f32, EXTRA_ROUNDING[dtype])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    eos = set(ours.tokenizer.stop_ids)
    identical = 0
    for conversation in CONVERSATIONS:
        prompt = ours.tokenizer.apply_chat_template(conversation)
        prompt_ids = ours.tokenizer.encode(prompt)
        # llama.cpp's own tokenizer, built from the exported metadata, splits the prompt the same way
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == prompt_ids
        theirs = llama_cpp_greedy(llm, prompt_ids, eos)
        identical += ours.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0.0).tokens == theirs
        sequence = prompt_ids + theirs
        start = len(prompt_ids) - 1  # the logits that predict llama.cpp's first token
        logits = ours.logits(sequence)[start : start + len(theirs)]
        delta = np.abs(perturbed.logits(sequence) - smollm2_f32.logits(sequence))[start : start + len(theirs)].max(-1)
        chosen = logits[np.arange(len(theirs)), theirs]
        shortfall = logits.max(-1) - chosen
        bad = np.flatnonzero(shortfall > 2 * delta)
        assert bad.size == 0, (
            f"{dtype}: llama.cpp chose token {theirs[bad[0]]} at step {bad[0]} for {conversation[0]['content']!r}, "
            f"{shortfall[bad[0]]:.4f} below afmkit's best, more than twice the rounding effect {delta[bad[0]]:.4f}"
        )
        print(
            f"{dtype}: {len(theirs)} tokens, largest shortfall {shortfall.max():.4f} (allowed {2 * delta.min():.4f}+)"
        )
    print(f"{dtype}: {identical}/{len(CONVERSATIONS)} greedy sequences identical")  # docs/interop.md
