"""Process-wide settings every command shares: the cache directory, XLA's compile cache and the
commands' malloc settings (training commands keep freed memory; the others give large freed blocks
back; AFMKIT_MALLOC=default leaves glibc's defaults everywhere), and the guard that keeps a
long-lived process's compiled code under the kernel's memory-mapping limit."""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path
from typing import Any

import jax
from jax import monitoring


def cache_dir() -> Path:
    """Where afmkit keeps converted checkpoints, tokenized corpora, kernels and compiled programs
    (``$AFMKIT_CACHE``, default ``~/.cache/afmkit``)."""
    return Path(os.environ.get("AFMKIT_CACHE", Path.home() / ".cache" / "afmkit"))


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk so a new process skips recompiling known shapes."""
    if os.environ.get("AFMKIT_NO_XLA_CACHE") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# glibc settings that keep freed memory in the process: one arena, no mmap, never trim the heap.
# XLA:CPU allocates one temporary buffer per call of a training step (4.5 GB for SmolLM2's full
# gradient at 8x256 tokens) and frees it on return; with glibc's defaults that buffer is mmapped
# and unmapped each call, so every step faults it in again (docs/training.md, "Memory the trainer keeps").
KEEP_FREED_MEMORY = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def _malloc_settings_are_ours() -> bool:
    """True on Linux with glibc unless ``AFMKIT_MALLOC=default`` or ``GLIBC_TUNABLES`` sets a
    malloc tunable (the user's, or the training restart's: a restarted process keeps them)."""
    if sys.platform != "linux" or os.environ.get("AFMKIT_MALLOC") == "default":
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):
        return False
    return "glibc.malloc." not in os.environ.get("GLIBC_TUNABLES", "")


def restart_keeping_freed_memory() -> None:
    """Re-execute this process with :data:`KEEP_FREED_MEMORY` in ``GLIBC_TUNABLES`` (glibc reads
    it only at start-up). Training commands call it before loading anything; the process then
    keeps its peak memory until it exits, which suits a run whose peak returns every step.

    Does nothing off Linux/glibc, when ``GLIBC_TUNABLES`` already sets any malloc tunable (the
    user's choice wins, and the restarted process sees the variable, so it never loops), or when
    ``AFMKIT_MALLOC=default``."""
    if not _malloc_settings_are_ours():
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    os.environ["GLIBC_TUNABLES"] = f"{current}:{KEEP_FREED_MEMORY}" if current else KEEP_FREED_MEMORY
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # no interpreter to re-run (an embedded Python): train with glibc's defaults
        if current:
            os.environ["GLIBC_TUNABLES"] = current
        else:
            del os.environ["GLIBC_TUNABLES"]


# Commands that do not train (generate, chat, serve, eval) mmap blocks of at least this many
# bytes, so they go back to the OS when freed. glibc's default threshold rises to the size of each
# mmapped block freed (up to 32 MiB), so after an engine's first call its KV caches and XLA's
# buffers come from the heap instead, which fragments and is not given back: the 3.5-bit model's
# RSS stayed at its peak, 1.2 GiB, with half a GiB of it free. It cost int4 prefill a fifth while
# the kernels made a fresh buffer per call; with per-thread buffers the cost is inside the runs'
# spread (docs/compression.md, "Freed blocks back to the OS").
RETURN_FREED_ABOVE = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at :data:`RETURN_FREED_ABOVE` for this process (it can be set
    after start-up: the threshold is process-wide). Returns whether it was set. Nothing changes
    with ``AFMKIT_MALLOC=default``, off Linux/glibc, or when malloc settings were chosen: in
    ``GLIBC_TUNABLES`` or a glibc ``MALLOC_*_`` variable such as ``MALLOC_MMAP_THRESHOLD_``."""
    if not _malloc_settings_are_ours():
        return False
    if any(n.startswith("MALLOC_") and n.endswith("_") for n in os.environ):
        return False
    import ctypes

    return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, RETURN_FREED_ABOVE))


# -- compiled code and the kernel's mapping limit --------------------------------------------------
# XLA:CPU maps each compiled program's code into pages of its own: three mappings for the smallest
# program, 360-530 for each batch bucket an engine meets (docs/serving.md, "Faults and shutdown"). Linux
# allows a process vm.max_map_count mappings (65,530 by default); past it LLVM cannot map the code
# it just compiled and the next compile segfaults. Dropping JAX's compiled programs unmaps them;
# the ones still in use compile again (or load from the persistent cache) on their next call.
_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")
_code_added = threading.Event()
_watching = threading.Lock()
_watched = False


def map_limit() -> int:
    """The kernel's limit on this process's memory mappings (``vm.max_map_count``)."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530  # Linux's default


def memory_mappings() -> int:
    """How many memory mappings this process holds (lines of ``/proc/self/maps``; 0 off Linux)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0


def release_compiled_code(share: float = 0.5) -> bool:
    """Drop JAX's compiled programs when this process holds more than ``share`` of its mapping
    limit (say so on stderr). Returns whether it did. Call it when no program is running."""
    held, limit = memory_mappings(), map_limit()
    if held <= share * limit:
        return False
    jax.clear_caches()
    gc.collect()
    print(
        f"afmkit: dropped compiled programs ({held} -> {memory_mappings()} memory mappings; the kernel allows "
        f"{limit}); programs in use compile again on their next call",
        file=sys.stderr,
    )
    return True


def _note_code(event: str, duration: float, **_: Any) -> None:
    if event in _COMPILE_EVENTS:
        _code_added.set()


def watch_compiled_code() -> None:
    """Note every program compiled or loaded from the persistent cache from now on (once per
    process), for :func:`code_added`."""
    global _watched
    with _watching:
        if not _watched:
            monitoring.register_event_duration_secs_listener(_note_code)
            _watched = True


def code_added() -> bool:
    """Whether a program was compiled or loaded since the last call (after
    :func:`watch_compiled_code`): a step that compiled nothing need not count mappings."""
    added = _code_added.is_set()
    _code_added.clear()
    return added
