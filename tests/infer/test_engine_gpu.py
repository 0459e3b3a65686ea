"""The engine on a GPU gives the CPU's greedy tokens for the real SmolLM2-135M-Instruct in fp32,
base rows and LoRA rows in one batch. Skipped without a GPU (CI has none); on a machine with one:

    JAX_PLATFORMS=cuda,cpu python -m pytest tests/infer/test_engine_gpu.py tests/train/test_objectives_gpu.py

Each side runs in its own process with one platform (``JAX_PLATFORMS``), so nothing of the other
leaks in. Matmuls run at "highest" precision (true fp32, no TF32 on the GPU), so the two sides
differ only in the order of fp32 sums and in their exp/rsqrt (~1e-6 relative on the logits), far
below the gap between a greedy token and the runner-up: the tokens must be equal."""

import json
import os
import subprocess
import sys

import pytest

GREEDY_RUN = r"""
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import afmkit
from afmkit.adapters.lora import LoraConfig, random_adapter

lm = afmkit.load("smollm2-135m-instruct", dtype="float32")
questions = ["What is the capital of France?", "Write a haiku about rain.",
             "List three uses of a paperclip.", "Explain what a prime number is in one sentence."]
prompts = [[{"role": "user", "content": q}] for q in questions]
adapter = random_adapter(lm.config, LoraConfig(rank=16), jax.random.PRNGKey(7), b_std=0.02)
base = [c.tokens for c in lm.chat(prompts, max_new_tokens=32, temperature=0)]
mixed = [c.tokens for c in lm.chat(prompts, max_new_tokens=32, temperature=0, adapter=[None, adapter, None, adapter])]
print(json.dumps({"platform": jax.default_backend(), "base": base, "mixed": mixed}))
"""


def _has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


pytestmark = pytest.mark.skipif(not _has_gpu(), reason="no GPU (run with JAX_PLATFORMS=cuda,cpu where there is one)")


def _greedy(platform: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": platform}
    done = subprocess.run([sys.executable, "-c", GREEDY_RUN], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gpu_greedy_tokens_equal_cpu_with_mixed_adapter_rows():
    cpu, gpu = _greedy("cpu"), _greedy("cuda")
    assert (cpu["platform"], gpu["platform"]) == ("cpu", "gpu")
    assert cpu["mixed"][1] != cpu["base"][1], "the adapter must change its rows, or the check proves nothing"
    assert gpu["base"] == cpu["base"]
    assert gpu["mixed"] == cpu["mixed"]
