"""Talaria's page: the FastAPI app (the grading page's stack) that serves the analysis, checks
recipes with ``parse_recipe``, exports them and verifies them in the background.

Routes: ``/`` and ``/talaria.js`` (the page, ``static/``); ``GET /api/analysis`` (everything the
page computes from, so a what-if never waits for the server); ``POST /api/recipe`` (a recipe
JSON checked against this model: the parsed recipe, or 400 with ``parse_recipe``'s one line);
``POST /api/export`` (bits -> the recipe JSON ``afmkit compress palettize --recipe`` takes);
``POST /api/verify`` (start compressing and measuring a choice) and ``GET /api/verify`` (its
progress and result).
"""

from __future__ import annotations

import threading
import traceback
from importlib import resources
from typing import Any

from afmkit.errors import UserError
from afmkit.talaria.settings import TalariaSettings
from afmkit.talaria.verify import make_recipe, recipe_of, verify

_DEFAULTS = TalariaSettings()


def _static(name: str) -> str:
    return resources.files("afmkit.talaria").joinpath("static", name).read_text(encoding="utf-8")


class VerifyJob:
    """One verification at a time, in a background thread; its state is what the page polls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: dict[str, Any] = {"running": False, "phase": "idle", "fraction": 0.0, "result": None, "error": None}

    def start(self, run: Any) -> bool:
        with self.lock:
            if self.state["running"]:
                return False
            self.state = {"running": True, "phase": "starting", "fraction": 0.0, "result": None, "error": None}

        def progress(phase: str, fraction: float) -> None:
            with self.lock:
                self.state.update(phase=phase, fraction=fraction)

        def work() -> None:
            try:
                result, error = run(progress), None
            except UserError as exc:
                result, error = None, str(exc)
            except Exception as exc:  # shown on the page rather than lost in a thread
                traceback.print_exc()
                result, error = None, f"verification failed: {type(exc).__name__}: {exc}"
            with self.lock:
                self.state.update(
                    running=False, result=result, error=error, phase="done" if error is None else "failed"
                )

        threading.Thread(target=work, daemon=True).start()
        return True

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.state)


def _bits(analysis: dict[str, Any], body: dict[str, Any]) -> tuple[dict[str, int], int]:
    bits = body.get("bits")
    if not isinstance(bits, dict):
        raise UserError('the request needs "bits": {matrix name: bit width}')
    return bits, body.get("embed_bits", 8)


def create_app(
    analysis: dict[str, Any],
    *,
    model: Any = None,
    eval_text: str | None = None,
    settings: TalariaSettings = _DEFAULTS,
) -> Any:
    """The app for one analysed model; ``model`` (float) and ``eval_text`` enable Verify."""
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response

    app = FastAPI(title="afmkit Talaria", docs_url=None, redoc_url=None)
    job = VerifyJob()
    page = {**analysis, "device": settings.device, "can_verify": model is not None and eval_text is not None}

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return _static("talaria.html")

    @app.get("/talaria.js")
    def script() -> Response:
        return Response(_static("talaria.js"), media_type="text/javascript")

    @app.get("/api/analysis")
    def get_analysis() -> dict[str, Any]:
        return page

    def checked(data: Any, source: str) -> Any:
        try:
            return recipe_of(analysis, data, source=source)
        except UserError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @app.post("/api/recipe")
    def load_recipe(body: Any = Body(...)) -> dict[str, Any]:  # noqa: B008
        return checked(body, "the loaded recipe").to_dict()

    @app.post("/api/export")
    def export(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        try:
            bits, embed_bits = _bits(analysis, body)
            data = make_recipe(analysis, bits, embed_bits).to_dict()
        except (UserError, KeyError, TypeError, ValueError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return checked(data, "the exported recipe").to_dict()  # what compress will read back

    @app.post("/api/verify")
    def start_verify(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        if not page["can_verify"]:
            raise HTTPException(status_code=409, detail="this page was started without a model to verify with")
        try:
            bits, embed_bits = _bits(analysis, body)
            recipe = checked(make_recipe(analysis, bits, embed_bits).to_dict(), "the chosen bits")
        except (UserError, KeyError, TypeError, ValueError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        if not job.start(lambda progress: verify(model, analysis, recipe, eval_text, settings, progress=progress)):
            raise HTTPException(status_code=409, detail="a verification is already running; wait for it")
        return job.snapshot()

    @app.get("/api/verify")
    def verify_state() -> dict[str, Any]:
        return job.snapshot()

    return app


def check_port(host: str, port: int) -> None:
    """One line when ``port`` is taken, before the (slow) model load and analysis."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port") from None


def serve(app: Any, *, host: str = TalariaSettings.host, port: int = TalariaSettings.port) -> None:
    import uvicorn

    print(f"Talaria at http://{host}:{port}/ ; Ctrl-C stops")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc}); pick another --port") from None
