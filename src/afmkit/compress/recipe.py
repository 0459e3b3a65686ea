"""The compression recipe: which bits each matrix gets, as a JSON file.

``afmkit compress palettize`` writes one beside every compressed model and takes one with
``--recipe``; Talaria (issue 14) writes them too. Every check of a recipe lives in
``parse_recipe``, so the command line and the page refuse the same files with the same one-line
messages::

    {
      "format": "afmkit-compress-recipe", "version": 1,
      "model": {"name": "smollm2-135m-instruct", "fingerprint": "3f2a..."},
      "group_rows": 16, "per_row_scale": true, "embed_bits": 8,
      "bits": {"layers.0.wq": 4, "layers.0.wk": 4, ...},        # every linear-layer matrix
      "calibration": {"file": "...", "sha256": "...", "start": 0, "tokens": 8192, "seq_len": 512},
      "predicted": {"bits_per_weight": 3.49, "sensitivity": 0.21, "sensitivity_kind": "proxy"}
    }

``calibration`` and ``predicted`` are informational (where the choice came from); a hand-written
recipe may leave them out. ``model.fingerprint`` (``sensitivity.model_fingerprint``) ties a recipe
to the float weights it was made for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from afmkit.compress.allocate import BIT_WIDTHS
from afmkit.errors import UserError

FORMAT = "afmkit-compress-recipe"
VERSION = 1
EMBED_BIT_WIDTHS = (4, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    model_name: str
    fingerprint: str
    bits: dict[str, int]  # every linear-layer matrix, by its weight name ("layers.3.wq")
    group_rows: int = 16
    per_row_scale: bool = True
    embed_bits: int = 8
    calibration: dict[str, Any] | None = None
    predicted: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "group_rows": self.group_rows,
            "per_row_scale": self.per_row_scale,
            "embed_bits": self.embed_bits,
            "bits": dict(self.bits),
        }
        if self.calibration is not None:
            out["calibration"] = self.calibration
        if self.predicted is not None:
            out["predicted"] = self.predicted
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_recipe(
    data: Any, *, source: str, fingerprint: str, matrices: Iterable[str], model_name: str | None = None
) -> Recipe:
    """A ``Recipe`` from parsed JSON, checked against the model it will compress (``fingerprint``,
    its matrix names); every refusal is one ``UserError`` line naming ``source``."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a JSON object, found {type(data).__name__}")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise UserError(
            f'{source}: not an afmkit compression recipe (needs "format": "{FORMAT}", "version": {VERSION}); '
            "write one with 'afmkit compress palettize' or Talaria"
        )
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        raise UserError(f'{source}: "model" must be an object with "name" and "fingerprint"')
    if model["fingerprint"] != fingerprint:
        made_for = model.get("name", "another model")
        here = f" {model_name}" if model_name else ""
        raise UserError(
            f"{source}: the recipe was made for {made_for} (fingerprint {model['fingerprint']}), not for this "
            f"model{here} (fingerprint {fingerprint}); make a recipe for this model"
        )
    group_rows, per_row_scale, embed_bits = (
        data.get("group_rows", 16),
        data.get("per_row_scale", True),
        data.get("embed_bits", 8),
    )
    if not _int(group_rows) or group_rows < 1:
        raise UserError(f'{source}: "group_rows" must be a positive integer, got {group_rows!r}')
    if not isinstance(per_row_scale, bool):
        raise UserError(f'{source}: "per_row_scale" must be true or false, got {per_row_scale!r}')
    if embed_bits not in EMBED_BIT_WIDTHS or not _int(embed_bits):
        raise UserError(f'{source}: "embed_bits" must be one of {EMBED_BIT_WIDTHS}, got {embed_bits!r}')
    bits = data.get("bits")
    if not isinstance(bits, dict):
        raise UserError(f'{source}: "bits" must be an object mapping matrix names to bit widths')
    known = list(matrices)
    unknown = [name for name in bits if name not in set(known)]
    if unknown:
        raise UserError(
            f"{source}: unknown matrix {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; this model's matrices are named like {known[0]!r} ... {known[-1]!r}"
        )
    missing = [name for name in known if name not in bits]
    if missing:
        raise UserError(
            f"{source}: no bit width for {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; a recipe gives every linear-layer matrix its bits"
        )
    for name, b in bits.items():
        if not _int(b) or b not in BIT_WIDTHS:
            raise UserError(f"{source}: {name} has bit width {b!r}; use one of {', '.join(map(str, BIT_WIDTHS))}")
    for key in ("calibration", "predicted"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise UserError(f'{source}: "{key}" must be an object when present')
    return Recipe(
        model_name=str(model.get("name", "")),
        fingerprint=model["fingerprint"],
        bits={name: bits[name] for name in known},
        group_rows=group_rows,
        per_row_scale=per_row_scale,
        embed_bits=embed_bits,
        calibration=data.get("calibration"),
        predicted=data.get("predicted"),
    )


def read_recipe(
    path: str | os.PathLike, *, fingerprint: str, matrices: Iterable[str], model_name: str | None = None
) -> Recipe:
    """``parse_recipe`` of a file; a missing or malformed file is one line too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    return parse_recipe(data, source=str(path), fingerprint=fingerprint, matrices=matrices, model_name=model_name)


def bits_by_type(bits: Mapping[str, int]) -> dict[str, dict[int, int]]:
    """How many matrices of each type (``wq``, ``w_down``, ...) got each width: for reports."""
    out: dict[str, dict[int, int]] = {}
    for name, b in bits.items():
        kind = name.rsplit(".", 1)[-1]
        out.setdefault(kind, {})
        out[kind][b] = out[kind].get(b, 0) + 1
    return {kind: dict(sorted(counts.items())) for kind, counts in out.items()}
