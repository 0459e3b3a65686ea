"""SmolLM2 exported to GGUF runs in llama.cpp (through llama-cpp-python) with the same greedy
tokens as afmkit on the same weights, at f32 and q8_0. Slow (three SmolLM2 loads per dtype) and
skipped where ``llama_cpp`` is not installed: ``pip install llama-cpp-python`` builds llama.cpp."""

import numpy as np
import pytest

import afmkit
from afmkit.interop.export import export_model

llama_cpp = pytest.importorskip("llama_cpp")

NEW_TOKENS = 32
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers larger than 100."}],
]


@pytest.fixture(scope="module")
def smollm2_f32():
    return afmkit.load("smollm2-135m-instruct", dtype="float32")


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
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    eos = set(ours.tokenizer.stop_ids)
    for conversation in CONVERSATIONS:
        prompt = ours.tokenizer.apply_chat_template(conversation)
        prompt_ids = ours.tokenizer.encode(prompt)
        # llama.cpp's own tokenizer, from the exported metadata, must split the prompt the same way
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == prompt_ids
        theirs = llama_cpp_greedy(llm, prompt_ids, eos)
        completion = ours.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0.0)
        if completion.tokens != theirs:
            # Only a near-tie may flip a greedy choice: llama.cpp rounds activations to 8 bits in
            # its q8_0 dot products, afmkit does not. Report the top-2 margin where they part.
            first = next(i for i, (a, b) in enumerate(zip(completion.tokens, theirs)) if a != b)
            logits = ours.logits(prompt_ids + theirs[:first])[-1]
            top2 = np.sort(logits)[-2:]
            pytest.fail(
                f"{dtype}: greedy tokens differ at {first} for {conversation[0]['content']!r}; "
                f"afmkit's top-2 margin there is {top2[1] - top2[0]:.4f}"
            )
