"""Shared fixtures. Several simulated CPU devices, so sharding tests run on any machine; this
must be set before JAX is imported anywhere."""

import hashlib
import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference models load from local files only

import jax
import jaxlib
import pytest

import afmkit
from afmkit import kernels
from afmkit.config import get_size
from afmkit.model.transformer import init_params
from afmkit.runtime import cache_dir, release_compiled_code


@pytest.fixture(autouse=True, scope="module")
def mappings_below_the_kernel_limit():
    """XLA:CPU maps each compiled program's code into pages of its own (three mappings for the
    smallest, more for large ones), and the suite compiles thousands of programs in one process.
    Past the kernel's limit (``vm.max_map_count``, 65,530) LLVM cannot map code ("LLVM compilation
    error: Cannot allocate memory") and that compile segfaults: CI's exit 139. So once a module
    leaves more than a third of the limit mapped, drop JAX's caches; programs a fixture still holds
    compile again when used. (An engine does the same on its own at half the limit: the suite
    compiles many programs outside engines.)"""
    yield
    release_compiled_code(share=1 / 3)


def pytest_configure(config):
    """XLA's persistent cache for the suite, one per CPU and jaxlib: a run skips recompiling what
    an earlier run on this machine compiled, and never loads programs compiled for another CPU (a
    home directory shared between machines). The commands the tests start use it too."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the user's, or a pytest that a test started
        return
    identity = f"{kernels.cpu_identity()}|{jaxlib.__version__}".encode()
    path = str(cache_dir() / "xla-tests" / hashlib.sha256(identity).hexdigest()[:16])
    settings = {"compilation_cache_dir": path, "persistent_cache_min_compile_time_secs": 0.5}  # as the runtime's
    for name, value in settings.items():
        os.environ[f"JAX_{name.upper()}"] = str(value)  # for the commands tests start
        jax.config.update(f"jax_{name}", value)  # this process imported JAX already


# A worker's resident memory peaks at about 8 GiB over the suite (8,423,468 kB, the largest
# reference models and training fixtures; sampled every 20 s in session 42's serial run), so
# workers are limited by memory as well as cores.
GIB_PER_WORKER = 8


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core the process may use, as many as the
    available memory holds; ``PYTEST_XDIST_AUTO_NUM_WORKERS`` or ``-n N`` choose instead."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
        by_memory = kib // (GIB_PER_WORKER << 20)
    except (OSError, StopIteration, ValueError):
        by_memory = cores
    return max(1, min(cores, by_memory))


def pytest_sessionstart(session):
    # A native crash (exit 139) then shows the crashing thread's C++ stack, not only the Python line.
    import native_backtrace

    native_backtrace.install()


@pytest.fixture(scope="session")
def smollm2() -> afmkit.LanguageModel:
    """The embedded default model, SmolLM2-135M-Instruct, in fp32: the parity reference (the
    default on CPUs is the file's own 4-bit weights, ``dtype="int4"``)."""
    return afmkit.load("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_gguf():
    from afmkit.weights import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def tiny_model(smollm2) -> afmkit.LanguageModel:
    """A random afm-tiny (GQA, q/k-norm, tied embedding) with SmolLM2's tokenizer."""
    config = get_size("afm-tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    return afmkit.LanguageModel(config, params, smollm2.tokenizer, name="afm-tiny-random")


@pytest.fixture(scope="session")
def peaked_model(tiny_model) -> afmkit.LanguageModel:
    """The random tiny model with its logits scaled by 8 (the final norm's gain): a few dozen
    tokens carry most of each next-token distribution, as in a trained model, instead of all
    49,152 about equally."""
    params = {**tiny_model.params, "final_norm": tiny_model.params["final_norm"] * 8}
    return afmkit.LanguageModel(tiny_model.config, params, tiny_model.tokenizer, name="afm-tiny-peaked")


@pytest.fixture
def child_pytest(request):
    """Run tests of the calling test's file in a child pytest with more environment (kernels built
    with other flags, AMX's tiles refused): ``child_pytest(env, selection)`` asserts that the tests
    ``selection`` names (``-k``) pass and that none is skipped."""

    def run(env: dict, selection: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-n", "0", str(request.path), "-k", selection],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-1000:]

    return run
