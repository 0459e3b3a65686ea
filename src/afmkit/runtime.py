"""Process-wide settings every command shares: the cache directory and XLA's compile cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax


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
