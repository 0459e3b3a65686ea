"""``afmkit eval sxs-ui``: people grade side-by-side pairs in a local web page.

The page (``static/sxs.html`` + ``static/sxs.js``, shipped in the package) shows a prompt and
the two models' responses as "A" and "B" in a random order (the server remembers which is which;
the page never learns the models), with Apple's preference scale: A much better / better /
slightly better / negligibly better, tie, and the same for B. Each grade is committed to a
SQLite file (WAL mode) the moment it is given, so closing the page or the server loses nothing
and a reload continues with the next ungraded pair. The report is the same as ``afmkit eval
sxs`` (win / tie / lose with 95% Wilson intervals).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from afmkit.errors import UserError
from afmkit.eval.graders import STRENGTHS

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    key TEXT PRIMARY KEY, prompt TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL,
    model_a TEXT NOT NULL DEFAULT 'A', model_b TEXT NOT NULL DEFAULT 'B'
);
CREATE TABLE IF NOT EXISTS shown (token TEXT PRIMARY KEY, pair TEXT NOT NULL, a_first INTEGER NOT NULL, created REAL);
CREATE TABLE IF NOT EXISTS grades (
    pair TEXT PRIMARY KEY, ord TEXT NOT NULL, shown_winner TEXT NOT NULL, strength TEXT,
    winner TEXT NOT NULL, created REAL NOT NULL
);
"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SxsUiSettings:
    """Defaults of ``afmkit eval sxs-ui`` and of ``serve``: the one source."""

    host: str = "127.0.0.1"  # address to listen on (this machine only)
    port: int = 8765


CHOICES = ("tie", *(f"{side} {s}" for side in ("A", "B") for s in STRENGTHS))


class GradeStore:
    """Pairs and human grades in one SQLite file; every write is its own committed transaction."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path} is not a usable SQLite grades file ({exc}); give a new --db path") from None
        self.lock = threading.Lock()

    def add_pairs(self, pairs: Sequence[dict[str, Any]]) -> int:
        """Insert pairs not yet stored (existing pairs and their grades are left alone)."""
        with self.lock:
            self.db.execute("BEGIN")
            before = self.count_pairs_unlocked()
            self.db.executemany(
                "INSERT OR IGNORE INTO pairs (key, prompt, a, b, model_a, model_b) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (str(p["key"]), p["prompt"], p["a"], p["b"], p.get("model_a", "A"), p.get("model_b", "B"))
                    for p in pairs
                ],
            )
            self.db.execute("COMMIT")
            return self.count_pairs_unlocked() - before

    def count_pairs_unlocked(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    def count_pairs(self) -> int:
        with self.lock:
            return self.count_pairs_unlocked()

    def progress(self) -> dict[str, int]:
        with self.lock:
            graded = self.db.execute("SELECT COUNT(*) FROM grades").fetchone()[0]
            return {"graded": graded, "total": self.count_pairs_unlocked()}

    def next_pair(self) -> dict[str, Any] | None:
        """The first ungraded pair, its responses in a fresh random order under a one-use token."""
        with self.lock:
            row = self.db.execute(
                "SELECT key, prompt, a, b FROM pairs WHERE key NOT IN (SELECT pair FROM grades) ORDER BY rowid LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            key, prompt, a, b = row
            a_first = secrets.randbelow(2) == 1
            token = secrets.token_urlsafe(12)
            self.db.execute(
                "INSERT INTO shown (token, pair, a_first, created) VALUES (?, ?, ?, ?)",
                (token, key, int(a_first), time.time()),
            )
            left, right = (a, b) if a_first else (b, a)
            return {"token": token, "prompt": prompt, "left": left, "right": right}

    def grade(self, token: str, choice: str) -> dict[str, Any]:
        """Record a grade for the pair shown under ``token`` ("A ..." = the left response)."""
        if choice not in CHOICES:
            raise UserError(f"unknown choice {choice!r}; one of: {', '.join(CHOICES)}")
        with self.lock:
            row = self.db.execute("SELECT pair, a_first FROM shown WHERE token = ?", (token,)).fetchone()
            if row is None:
                raise UserError("unknown or expired pair token; reload the page")
            pair, a_first = row
            order = "ab" if a_first else "ba"
            if choice == "tie":
                shown_winner, strength = "tie", None
            else:
                side, strength = choice.split(" ", 1)
                shown_winner = "first" if side == "A" else "second"
            from afmkit.eval.sxs import model_winner

            self.db.execute(
                "INSERT OR REPLACE INTO grades (pair, ord, shown_winner, strength, winner, created) VALUES (?, ?, ?, ?, ?, ?)",
                (pair, order, shown_winner, strength, model_winner(shown_winner, order), time.time()),
            )
            return {"pair": pair}

    def grades(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.db.execute(
                "SELECT pair, ord, shown_winner, strength, winner FROM grades ORDER BY created"
            ).fetchall()
        return [
            {"key": pair, "pair": pair, "order": order, "shown_winner": sw, "strength": strength, "winner": winner}
            for pair, order, sw, strength, winner in rows
        ]

    def models(self) -> tuple[str, str]:
        with self.lock:
            row = self.db.execute("SELECT model_a, model_b FROM pairs LIMIT 1").fetchone()
        return (row[0], row[1]) if row else ("A", "B")

    def report(self) -> dict[str, Any]:
        from afmkit.eval.sxs import report_from_grades

        model_a, model_b = self.models()
        with self.lock:
            rows = self.db.execute("SELECT key, a, b FROM pairs").fetchall()
        pairs = [{"key": key, "a": a, "b": b} for key, a, b in rows]
        return report_from_grades(self.grades(), model_a=model_a, model_b=model_b, grader="human", pairs=pairs)


def _static(name: str) -> str:
    return resources.files("afmkit.eval").joinpath("static", name).read_text(encoding="utf-8")


def create_app(store: GradeStore) -> Any:
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response

    app = FastAPI(title="afmkit side-by-side grading", docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return _static("sxs.html")

    @app.get("/sxs.js")
    def script() -> Response:
        return Response(_static("sxs.js"), media_type="text/javascript")

    @app.get("/api/next")
    def next_pair() -> dict[str, Any]:
        pair = store.next_pair()
        return {"done": pair is None, "pair": pair, "choices": list(CHOICES), **store.progress()}

    @app.post("/api/grade")
    def grade(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        try:
            store.grade(str(body.get("token", "")), str(body.get("choice", "")))
        except UserError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return store.progress()

    @app.get("/api/report")
    def report() -> dict[str, Any]:
        try:
            return store.report()
        except UserError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None

    return app


def serve(store: GradeStore, *, host: str = SxsUiSettings.host, port: int = SxsUiSettings.port) -> None:
    import uvicorn

    print(f"grading {store.count_pairs()} pairs at http://{host}:{port}/ (grades in {store.path}); Ctrl-C stops")
    try:
        uvicorn.run(create_app(store), host=host, port=port, log_level="warning")
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc}); pick another --port") from None
