"""Writing files so that a crash never leaves a half-written checkpoint or adapter behind, and
finding the data files afmkit ships (``packaged_data``) or the shared data folder used by tests."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from afmkit.errors import UserError


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it replaces ``dest`` whole.

    Until the final renames, an existing ``dest`` is untouched; if the body raises, the
    temporary directory is removed and ``dest`` stays as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest.parent, name=dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):  # sub-folders too (a reward model's adapter)
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# A temporary directory untouched this long belongs to a save that was killed: no live save
# goes an hour without creating a file in it (which updates its modification time).
STALE_AFTER_S = 3600.0


def remove_stale_temporaries(
    directory: str | os.PathLike, *, name: str | None = None, older_than_s: float = STALE_AFTER_S
) -> list[Path]:
    """Delete the ``.NAME.tmp-*`` directories that killed ``atomic_directory`` saves left in
    ``directory`` (all names, or only ``name``); returns what was removed. Fresh ones may belong
    to a save under way and are kept."""
    removed = []
    now = time.time()
    for path in Path(directory).glob(f".{'*' if name is None else glob.escape(name)}.tmp-*"):
        with contextlib.suppress(OSError):  # gone already, or not ours to delete
            if path.is_dir() and now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path)
                removed.append(path)
    return removed


def packaged_data(relative: str) -> Path:
    """A data file that ships inside afmkit (``afmkit/resources``, see its README.md for the
    sources and licences), e.g. ``packaged_data("ifeval/input_data.jsonl")``."""
    import importlib.resources

    path = Path(str(importlib.resources.files("afmkit.resources").joinpath(relative)))
    if not path.is_file():
        raise UserError(
            f"afmkit ships no data file {relative!r} (looked at {path}); the installation is incomplete: reinstall afmkit"
        )
    return path


def shared_data_dir() -> Path:
    """The shared data folder for CI-only tests and benchmarks (never needed by the product):
    ``$AFMKIT_SHARED_DATA``, else ``../shared/data`` beside the repository. It is never copied
    into the repository; what the commands need ships as ``packaged_data``."""
    override = os.environ.get("AFMKIT_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[3] / "shared" / "data"
