"""JSON Lines input and the append-only results file that makes evaluation runs resumable."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from afmkit.errors import UserError


def read_jsonl(path: str | os.PathLike, *, what: str = "file") -> list[dict[str, Any]]:
    """Every object of a JSONL file; a missing file or a bad line is a ``UserError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; give a JSONL file with one JSON object per line")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number} is not a JSON object; each line must be {{...}}")
            rows.append(row)
    if not rows:
        raise UserError(f"{what} {path} is empty")
    return rows


def require_fields(
    row: dict[str, Any], fields: dict[str, type | tuple[type, ...]], *, path: str | os.PathLike, line: int
) -> None:
    """A ``UserError`` naming the file and line when a field is missing or has the wrong type."""
    for name, kind in fields.items():
        if name not in row:
            raise UserError(f"{path} line {line} has no {name!r} field")
        if not isinstance(row[name], kind):
            wanted = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise UserError(f"{path} line {line}: {name!r} must be a {wanted}, got {type(row[name]).__name__}")


class ResultsFile:
    """An append-only JSONL of finished results, keyed by ``key_field``.

    Each result is written and flushed (and fsynced) as soon as it exists, so an interrupted run
    loses at most the line being written. On reopening, complete lines are kept; a torn last
    line (a crash mid-write) is cut off; a bad line elsewhere is an error, never silently dropped.
    """

    def __init__(self, path: str | os.PathLike, *, key_field: str = "key") -> None:
        self.path = Path(path)
        self.key_field = key_field
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        offset = 0
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            offset += len(raw)
            complete = raw.endswith(b"\n")
            if not raw.strip():
                good_end = offset if complete else good_end
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if not complete:  # the last line was cut off by an interruption: redo that item
                    break
                raise UserError(
                    f"{self.path} line {number} is not valid JSON; it is a results file of an earlier run: "
                    "fix or delete that line (or the file, to start over)"
                ) from None
            if not complete:
                break
            if not isinstance(row, dict) or self.key_field not in row:
                raise UserError(f"{self.path} line {number} has no {self.key_field!r}; is this the right results file?")
            self.rows[str(row[self.key_field])] = row
            good_end = offset
        if good_end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(good_end)

    def __contains__(self, key: object) -> bool:
        return str(key) in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: object) -> dict[str, Any] | None:
        return self.rows.get(str(key))

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[str(row[self.key_field])] = row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows.values())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
