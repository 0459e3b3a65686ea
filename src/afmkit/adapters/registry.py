"""Adapters by name from a directory: loaded on first use, kept in a byte-bounded LRU cache.

Clients address adapters by name only (``summarize``), never by path: a name is one
directory component of letters, digits, ``.``, ``_`` and ``-`` that cannot climb out of the
adapter directory. The cache holds at most ``budget_bytes`` of adapter weights; the least
recently used adapters are evicted to make room and reloaded transparently on their next use.
An evicted adapter stays alive for the requests that already hold it (they keep a reference),
so a request always finishes with the adapter it started with.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
from pathlib import Path

from afmkit.adapters.lora import LoraAdapter
from afmkit.adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE, base_fingerprint, load_adapter
from afmkit.config import ModelConfig
from afmkit.errors import UserError
from afmkit.files import remove_stale_temporaries
from afmkit.model.transformer import Params

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AdapterNotFoundError(UserError):
    """No adapter of that name in the adapter directory."""


class AdapterBudgetError(UserError):
    """The cache's byte budget cannot hold even this one adapter."""


def check_name(name: str) -> str:
    """``name`` if it is a valid adapter name; a ``UserError`` otherwise (paths included)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise UserError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
            "(a name, not a path), starting with a letter or digit"
        )
    return name


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


class AdapterRegistry:
    """Named adapters of one base model, cached in memory under a byte budget (thread-safe)."""

    def __init__(
        self, directory: str | Path, *, config: ModelConfig, params: Params, budget_bytes: int = 1 << 30
    ) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UserError(f"adapter directory {self.directory} does not exist; create it or pass another --adapters")
        remove_stale_temporaries(self.directory)  # left by adapter saves that were killed
        self.config = config
        self.fingerprint = base_fingerprint(config, params)
        self.budget_bytes = int(budget_bytes)
        self.stats = CacheStats()
        self._cache: collections.OrderedDict[str, LoraAdapter] = collections.OrderedDict()
        self._lock = threading.Lock()

    # -- names -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Adapters available on disk (directories holding an adapter config)."""
        return sorted(
            p.name for p in self.directory.iterdir() if NAME_PATTERN.match(p.name) and (p / CONFIG_FILE).is_file()
        )

    def path(self, name: str) -> Path:
        path = self.directory / check_name(name)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise AdapterNotFoundError(
                f"no adapter named {name!r} in {self.directory.name}/; available: {', '.join(self.names()) or 'none'}"
            )
        return path

    # -- cache -------------------------------------------------------------------------------
    @property
    def cached_bytes(self) -> int:
        return sum(a.nbytes for a in self._cache.values())

    def cached(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def get(self, name: str) -> LoraAdapter:
        """The adapter called ``name``: from the cache (a hit), else loaded from disk (a miss)."""
        with self._lock:
            adapter = self._cache.get(check_name(name))
            if adapter is not None:
                self._cache.move_to_end(name)
                self.stats.hits += 1
                return adapter
        path = self.path(name)
        start = time.perf_counter()
        adapter = load_adapter(path, config=self.config, fingerprint=self.fingerprint, name=name)
        with self._lock:
            self.stats.misses += 1
            self.stats.load_seconds += time.perf_counter() - start
            if adapter.nbytes > self.budget_bytes:
                raise AdapterBudgetError(
                    f"adapter {name!r} needs {adapter.nbytes / 2**20:.1f} MiB but the adapter cache holds at most "
                    f"{self.budget_bytes / 2**20:.1f} MiB; raise the cache budget (--cache-bytes)"
                )
            if name in self._cache:  # another thread loaded it meanwhile
                self._cache.move_to_end(name)
                return self._cache[name]
            self._cache[name] = adapter
            while self.cached_bytes > self.budget_bytes:
                self._cache.popitem(last=False)
                self.stats.evictions += 1
            return adapter

    def unload(self, name: str) -> bool:
        """Drop ``name`` from the cache; True if it was cached. Requests holding it keep it."""
        with self._lock:
            return self._cache.pop(check_name(name), None) is not None
