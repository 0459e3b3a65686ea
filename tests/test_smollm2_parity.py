"""afmkit against an independent implementation: Hugging Face transformers loading the same
GGUF file (its own dequantizer, tokenizer converter and PyTorch model)."""

import numpy as np
import pytest
import torch

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. It's 4:30pm on 2024-06-10!",
    "unicode": "Les élèves ont étudié: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, العربية.",
    "emoji": "I love pizza 🍕🍕 and rockets 🚀! Family: 👨‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽",
    "code": 'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint({k: v**2 for k, v in enumerate([3, 14, 159])})',
    "whitespace": "  leading spaces\n\n\n\ttabs\t\tand   runs    of   spaces   \r\n trailing   \n\n",
    "special": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model.eval(), tokenizer


@pytest.mark.parametrize("kind", list(TEXTS))
def test_tokenizer_ids_match_transformers(smollm2, reference, kind):
    _, hf_tokenizer = reference
    text = TEXTS[kind]
    ids = smollm2.tokenizer.encode(text)
    assert ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_are_single_tokens(smollm2):
    ids = smollm2.tokenizer.encode("12345 67")
    pieces = [smollm2.tokenizer.decode([i]) for i in ids]
    assert [p.strip() for p in pieces if p.strip()] == ["1", "2", "3", "4", "5", "6", "7"]


def test_chat_template_matches_transformers(smollm2, reference):
    _, hf_tokenizer = reference
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Bye"},
    ]
    ours = smollm2.tokenizer.apply_chat_template(messages)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


@pytest.mark.parametrize("kind", ["ascii", "unicode", "code", "whitespace"])
def test_logits_match_transformers(smollm2, reference, kind):
    hf_model, _ = reference
    ids = smollm2.tokenizer.encode(TEXTS[kind])
    ours = smollm2.logits(ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-3


@pytest.mark.parametrize("question", ["Write a short poem about the sea.", "Explain what a CPU does."])
def test_greedy_continuations_of_64_tokens_are_identical(smollm2, reference, question):
    hf_model, _ = reference
    ids = smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template([{"role": "user", "content": question}]))
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    theirs = out[0, len(ids) :].tolist()
    from afmkit.infer.engine import Engine
    from afmkit.infer.sampling import SamplingParams

    # No EOS, so both run the full 64 tokens, like min_new_tokens on the reference side.
    engine = Engine(smollm2.config, smollm2.params, smollm2.tokenizer, eos_ids=())
    ours = engine.generate([ids], SamplingParams(max_new_tokens=64))[0].tokens
    assert ours == theirs
