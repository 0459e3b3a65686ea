"""A training command's output directory (``--out``), the same rules for every recipe: nothing in
it is overwritten unless ``--resume`` is given, a resumed run must repeat the settings that
define it (its record, a JSON file in the directory, holds them), and its files are written whole
or not at all, so a killed run leaves each one as it was."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from afmkit.errors import UserError


class RunIdentity(dict):
    """``run_identity``'s mapping (written to the record as is), plus ``defaults``: each setting's
    default, which a record written before that setting existed is taken to hold."""

    defaults: dict[str, Any]


def run_identity(settings: Any, may_change: Sequence[str], **inputs: Any) -> RunIdentity:
    """The settings that define a run, as JSON holds them (tuples as lists): every field of the
    ``settings`` dataclass but ``resume`` and those in ``may_change`` (a resumed run may change
    them), then ``inputs`` (what the settings do not say, e.g. the model and data)."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    fields = {
        name: plain(value)
        for name, value in dataclasses.asdict(settings).items()
        if name not in (*may_change, "resume")
    }
    identity = RunIdentity({**fields, **inputs})
    identity.defaults = {
        f.name: plain(f.default) for f in dataclasses.fields(settings) if f.name in fields and f.default is not MISSING
    }
    return identity


def check_new_run(out: Path) -> None:
    """Without ``--resume``: ``out`` must be new or empty."""
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"{out} is not empty; choose a new --out, or pass --resume to continue the run in it (nothing was changed)"
        )


def check_resumed_run(out: Path, record: Path, identity: dict[str, Any], *, run: str, key: str | None = None) -> None:
    """With ``--resume``: ``record`` (a file in ``out``; its ``key`` entry when given) must hold
    the settings ``identity``; ``run`` names the kind of run in the message when it is missing.
    A setting the record lacks (added to afmkit after the run began) must be at its default, which
    by afmkit's rule for new settings keeps the old behaviour."""
    if not record.is_file():
        raise UserError(f"--resume: {out} holds no {run} run ({record.relative_to(out)}); start one without --resume")
    try:
        saved = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--resume: cannot read {record} ({exc}); it is damaged") from None
    if key is not None:
        saved = saved.get(key, {})
    defaults = getattr(identity, "defaults", {})
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {v!r}"
        for k, v in identity.items()
        if (saved[k] if k in saved else defaults.get(k, MISSING)) != v
    ]
    if diffs:
        raise UserError(f"--resume: the settings differ from the run in {out} ({'; '.join(diffs)}); repeat them")


def check_run_directory(
    out: Path, record: Path, identity: dict[str, Any], *, resume: bool, run: str, key: str | None = None
) -> None:
    """``--out`` against ``--resume``, before anything is written (``check_new_run`` or
    ``check_resumed_run``)."""
    if resume:
        check_resumed_run(out, record, identity, run=run, key=key)
    else:
        check_new_run(out)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, replacing ``path`` whole."""
    _write_text(path, json.dumps(data, indent=2))


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON object a line, replacing ``path`` whole."""
    _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """``data``, replacing ``path`` whole (a temporary file beside it, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def publish(out: Path, write: Callable[[Path], None]) -> None:
    """``write(directory)`` into a fresh directory beside ``out``, then each file moved into
    ``out``, replacing its previous version (the run's own files in ``out`` are left alone)."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.publish-", dir=out.parent))
    try:
        write(staging / "artifact")
        for path in (staging / "artifact").iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
