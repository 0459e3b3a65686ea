"""How much each matrix minds being palettized: Fisher information from calibration text, and per
matrix and bit width either a cheap proxy or a measured KL divergence.

**Fisher (``fisher_diagonal``).** SqueezeLLM's importance of a weight is the diagonal of the
Fisher information, the mean over calibration tokens of the squared gradient of the next-token
loss. One backward pass per token is out of reach, so each window of ``seq_len`` tokens gives one
gradient ``g`` of its *summed* token loss, and ``F = sum over windows of g^2 / tokens``: if token
gradients were uncorrelated, ``E[g^2] = T * E[g_t^2]``, so this estimates the per-token mean
(SqueezeLLM also takes one gradient per sequence). The model is the float one.

**Sensitivity of a matrix at b bits**, the predicted rise of the calibration loss when only that
matrix is palettized at b bits, in nats per token:

* ``proxy`` (default, the cost of k-means only): ``1/2 * sum F * (w - q)^2`` over the matrix,
  ``q`` its palettized value (8 bits extrapolated from 4, see ``proxy_sensitivity``): the second-order Taylor term of the loss with the Fisher standing
  in for the Hessian (the first-order term vanishes in expectation at a trained optimum);
* ``measured``: the mean KL divergence from the float model's next-token distribution to that of
  the model with only this matrix palettized, over ``measure_tokens`` calibration tokens: one
  forward pass per matrix and width (for SmolLM2-135M, 210 x 4 passes: slow, hence the proxy).
  Near the float model, KL = 1/2 * dw' F_true dw to second order, the quantity the proxy estimates.

``proxy_vs_measured`` reports how well the two rank-correlate on chosen matrices.

**Cache.** An analysis is kept in ``$AFMKIT_CACHE/compress/<model fingerprint>-<key>/`` where the
key hashes the calibration file's bytes and every setting that changes the numbers:
``analysis.json`` (small; what Talaria reads) and ``fisher.safetensors`` (the importance, which
sensitivity-weighted k-means needs again at compression time).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.compress.allocate import BIT_WIDTHS
from afmkit.compress.palettize import LAYER_MATRICES, palettize_matrix
from afmkit.compress.settings import CompressSettings
from afmkit.errors import UserError
from afmkit.model.packed import INPUT_AXES
from afmkit.model.transformer import logits_fn, token_nll
from afmkit.progress import ProgressReporter
from afmkit.runtime import cache_dir

ANALYSIS_FORMAT = "afmkit-compress-analysis"
ANALYSIS_VERSION = 1  # bump when the numbers an analysis holds would change for the same inputs
_DEFAULTS = CompressSettings()
EXTRAPOLATED = {8: 4}  # proxy widths taken from another's value, not clustered (see proxy_sensitivity)


# -- the model's matrices -----------------------------------------------------------------------


def matrix_names(params: Mapping[str, Any]) -> list[str]:
    """The linear-layer matrices' names (``layers.3.wq``), in layer order then ``LAYER_MATRICES``."""
    return [
        f"layers.{i}.{kind}" for i, layer in enumerate(params["layers"]) for kind in LAYER_MATRICES if kind in layer
    ]


def get_matrix(params: Mapping[str, Any], name: str) -> Any:
    _, index, kind = name.split(".")
    return params["layers"][int(index)][kind]


def matrix_shape(name: str, shape: Sequence[int]) -> tuple[int, int]:
    """``(K, N)``: inputs (the axes ``linear`` contracts) and outputs of a matrix."""
    ins = INPUT_AXES[name.rsplit(".", 1)[-1]]
    k = math.prod(shape[a] for a in ins)
    return k, math.prod(shape) // k


def matrix_shapes(params: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    return {name: matrix_shape(name, get_matrix(params, name).shape) for name in matrix_names(params)}


def model_fingerprint(config: Any, params: Mapping[str, Any]) -> str:
    """A short hash of the config and every weight's name, shape and fp32 bytes: what a recipe
    and a cached analysis are tied to (same weights, same fingerprint, whatever file they came
    from)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        value = np.ascontiguousarray(np.asarray(leaf, dtype=np.float32))
        digest.update(f"{jax.tree_util.keystr(path)}{value.shape}".encode())
        digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()


# -- calibration text -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Calibration:
    windows: np.ndarray  # int32 [n_windows, seq_len]
    file: str
    sha256: str  # of the whole file's bytes
    start: int  # first character used
    seq_len: int

    @property
    def tokens(self) -> int:
        return int(self.windows.size)

    def info(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "start": self.start,
            "tokens": self.tokens,
            "seq_len": self.seq_len,
        }


def read_calibration(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    start: int = _DEFAULTS.calibration_start,
    tokens: int = _DEFAULTS.calibration_tokens,
    seq_len: int = _DEFAULTS.seq_len,
) -> Calibration:
    """``tokens`` tokens of ``path`` from character ``start`` on, cut into windows of ``seq_len``
    (whole windows only; the text must hold at least one)."""
    path = Path(path)
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    if tokens < seq_len:
        raise UserError(f"--calibration-tokens ({tokens}) must be at least --seq-len ({seq_len})")
    if start < 0:
        raise UserError(f"--calibration-start must be 0 or more, got {start}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"calibration file {path} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot read calibration file {path}: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"calibration file {path} is not UTF-8 text (byte {exc.start})") from None
    # about 4 characters a token in English; read a margin more and cut after tokenizing
    ids = tokenizer.encode(text[start : start + 6 * tokens])
    n_windows = min(tokens, len(ids)) // seq_len
    if n_windows == 0:
        raise UserError(
            f"calibration file {path} has {len(ids)} tokens from character {start}, fewer than one window of "
            f"{seq_len}; give more text or a smaller --seq-len"
        )
    windows = np.asarray(ids[: n_windows * seq_len], np.int32).reshape(n_windows, seq_len)
    return Calibration(windows, str(path), hashlib.sha256(raw).hexdigest(), start, seq_len)


# -- Fisher information -------------------------------------------------------------------------


def _split(params: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the linear-layer matrices, everything else), so gradients are taken for the matrices only."""
    matrices = [{k: v for k, v in layer.items() if k in LAYER_MATRICES} for layer in params["layers"]]
    rest = {
        **params,
        "layers": [{k: v for k, v in layer.items() if k not in LAYER_MATRICES} for layer in params["layers"]],
    }
    return matrices, rest


def _merge(matrices: list[dict[str, Any]], rest: Mapping[str, Any]) -> dict[str, Any]:
    return {**rest, "layers": [{**r, **m} for r, m in zip(rest["layers"], matrices)]}


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(0,))
def _add_squared_gradients(acc: Any, matrices: Any, rest: Any, windows: jax.Array, *, config: Any) -> Any:
    """``acc`` plus, for each window, the square of the gradient of its summed token loss."""

    def window_loss(m: Any, row: jax.Array) -> jax.Array:
        logits = logits_fn(_merge(m, rest), row[None], config=config, activation_dtype=jnp.float32)[0]
        return token_nll(logits[:-1], row[1:])[0].sum()

    def step(total: Any, row: jax.Array) -> tuple[Any, None]:
        grad = jax.grad(window_loss)(matrices, row)
        return jax.tree.map(lambda a, g: a + g * g, total, grad), None

    return jax.lax.scan(step, acc, windows)[0]


def fisher_diagonal(
    config: Any, params: Mapping[str, Any], calibration: Calibration, *, batch: int = 2, quiet: bool = False
) -> dict[str, np.ndarray]:
    """The Fisher diagonal of every linear-layer matrix (name -> fp32 array shaped like it);
    ``batch`` windows per compiled call (the progress granularity)."""
    params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), params)
    matrices, rest = _split(params)
    acc = jax.tree.map(jnp.zeros_like, matrices)
    windows = calibration.windows
    with ProgressReporter("fisher", len(windows), unit="windows", quiet=quiet) as progress:
        for lo in range(0, len(windows), batch):
            chunk = jnp.asarray(windows[lo : lo + batch])
            acc = _add_squared_gradients(acc, matrices, rest, chunk, config=config)
            jax.block_until_ready(acc)
            progress.advance(len(chunk), tokens=int(chunk.size))
    scored = len(windows) * (calibration.seq_len - 1)
    return {
        f"layers.{i}.{kind}": np.asarray(value / scored, np.float32)
        for i, layer in enumerate(acc)
        for kind, value in layer.items()
    }


# -- palettizing one matrix ---------------------------------------------------------------------


def palettized_value(
    name: str, weight: np.ndarray, bits: int, importance: np.ndarray | None, *, group_rows: int, per_row_scale: bool
) -> np.ndarray:
    """``weight`` palettized at ``bits`` with ``importance``-weighted k-means and dequantized: the
    value the compressed model will compute with."""
    palettized = palettize_matrix(
        weight,
        bits,
        in_axes=INPUT_AXES[name.rsplit(".", 1)[-1]],
        group_rows=group_rows,
        per_row_scale=per_row_scale,
        importance=importance,
    )
    return np.asarray(_dequantize(palettized), np.float32)


# One compiled program per shape and width: run eagerly, ``dequantize``'s dozen array operations
# were compiled one by one (about 200 small compilations over SmolLM2's 4 shapes x 3 widths).
_dequantize = jax.jit(lambda palettized: palettized.dequantize())


def proxy_sensitivity(
    params: Mapping[str, Any],
    fisher: Mapping[str, np.ndarray],
    *,
    names: Iterable[str] | None = None,
    widths: Sequence[int] = BIT_WIDTHS,
    group_rows: int = _DEFAULTS.group_rows,
    per_row_scale: bool = _DEFAULTS.per_row_scale,
    extrapolated: Mapping[int, int] = EXTRAPOLATED,
    quiet: bool = False,
) -> dict[str, dict[int, float]]:
    """``1/2 * sum F (w - q)^2`` per matrix and width (see the module docstring). A width ``b`` in
    ``extrapolated`` (``{8: 4}``) is not clustered: its value is that of ``extrapolated[b]``
    times ``4 ** -(b - extrapolated[b])``, the high-resolution law (each added bit quarters the
    squared error). 256-entry k-means is 6x slower than the 2-, 3- and 4-bit ones together, and an
    8-bit matrix's error is negligible beside theirs (``benchmarks/compress_sensitivity.py``
    checks the law on real matrices)."""
    names = list(matrix_names(params) if names is None else names)
    skipped = {b: a for b, a in extrapolated.items() if b in widths and a in widths}
    clustered = [b for b in widths if b not in skipped]
    out: dict[str, dict[int, float]] = {}
    with ProgressReporter("sensitivity (proxy)", len(names) * len(clustered), unit="k-means", quiet=quiet) as progress:
        for name in names:
            w = np.asarray(get_matrix(params, name), np.float32)
            f = np.asarray(fisher[name], np.float32)
            by_width = {}
            for b in clustered:
                q = palettized_value(name, w, b, f, group_rows=group_rows, per_row_scale=per_row_scale)
                by_width[b] = float(0.5 * np.sum(f.astype(np.float64) * (w.astype(np.float64) - q) ** 2))
                progress.advance(1)
            for b, anchor in skipped.items():
                by_width[b] = by_width[anchor] * 4.0 ** -(b - anchor)
            out[name] = {b: by_width[b] for b in widths}
    return out


# -- measured sensitivity -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def _log_probs(params: Any, windows: jax.Array, *, config: Any) -> jax.Array:
    one = lambda row: jax.nn.log_softmax(logits_fn(params, row[None], config=config, activation_dtype=jnp.float32)[0])  # noqa: E731
    return jax.lax.map(one, windows)


@functools.partial(jax.jit, static_argnames=("config",))
def _mean_kl(params: Any, windows: jax.Array, reference: jax.Array, *, config: Any) -> jax.Array:
    """Mean over positions of KL(reference || model) of the next-token distributions."""

    def one(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        row, ref = args
        logp = jax.nn.log_softmax(logits_fn(params, row[None], config=config, activation_dtype=jnp.float32)[0])
        return jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1).mean()

    return jax.lax.map(one, (windows, reference)).mean()


def measured_sensitivity(
    config: Any,
    params: Mapping[str, Any],
    calibration: Calibration,
    fisher: Mapping[str, np.ndarray] | None,
    *,
    names: Iterable[str] | None = None,
    widths: Sequence[int] = BIT_WIDTHS,
    measure_tokens: int = _DEFAULTS.measure_tokens,
    group_rows: int = _DEFAULTS.group_rows,
    per_row_scale: bool = _DEFAULTS.per_row_scale,
    quiet: bool = False,
) -> dict[str, dict[int, float]]:
    """Mean KL (nats per token) from the float model to the model with only one matrix palettized,
    for each matrix in ``names`` (default: all) and width, on the first ``measure_tokens``
    calibration tokens (whole windows, at least one)."""
    params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), params)
    windows = jnp.asarray(calibration.windows[: max(1, measure_tokens // calibration.seq_len)])
    reference = _log_probs(params, windows, config=config)
    names = list(matrix_names(params) if names is None else names)
    out: dict[str, dict[int, float]] = {}
    with ProgressReporter("sensitivity (measured)", len(names) * len(widths), unit="passes", quiet=quiet) as progress:
        for name in names:
            _, index, kind = name.split(".")
            w = np.asarray(get_matrix(params, name), np.float32)
            importance = None if fisher is None else fisher[name]
            out[name] = {}
            for b in widths:
                q = palettized_value(name, w, b, importance, group_rows=group_rows, per_row_scale=per_row_scale)
                layers = list(params["layers"])
                layers[int(index)] = {**layers[int(index)], kind: jnp.asarray(q)}
                kl = _mean_kl({**params, "layers": layers}, windows, reference, config=config)
                out[name][b] = max(float(kl), 0.0)  # rounding can give -1e-9 for a lossless width
                progress.advance(1, tokens=int(windows.size))
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties take their mean rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def proxy_vs_measured(
    proxy: Mapping[str, Mapping[int, float]], measured: Mapping[str, Mapping[int, float]]
) -> dict[str, Any]:
    """Spearman correlation of proxy and measured sensitivity: over every (matrix, width) pair both
    hold, and across matrices at each width (what the allocation mostly trades)."""
    pairs = [(proxy[n][b], measured[n][b]) for n in measured for b in measured[n] if n in proxy and b in proxy[n]]
    out: dict[str, Any] = {"pairs": len(pairs), "spearman_all": spearman(*zip(*pairs)) if len(pairs) > 2 else None}
    widths = sorted({b for n in measured for b in measured[n]})
    out["spearman_by_width"] = {
        b: spearman([proxy[n][b] for n in measured], [measured[n][b] for n in measured]) if len(measured) > 2 else None
        for b in widths
    }
    return out


# -- the analysis and its cache -------------------------------------------------------------------


@dataclasses.dataclass
class Analysis:
    model_name: str
    fingerprint: str
    calibration: dict[str, Any]
    settings: dict[str, Any]  # what the numbers depend on besides the model and the text
    shapes: dict[str, tuple[int, int]]
    sensitivity: dict[str, dict[int, float]]  # name -> width -> predicted loss rise (nats/token)
    kind: str  # "proxy" or "measured"
    seconds: dict[str, float]  # time of each phase when it was computed
    fisher: dict[str, np.ndarray] | None = None  # loaded on demand (``load_fisher``)
    directory: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": ANALYSIS_FORMAT,
            "version": ANALYSIS_VERSION,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "calibration": self.calibration,
            "settings": self.settings,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "sensitivity_kind": self.kind,
            "sensitivity": {n: {str(b): v for b, v in by.items()} for n, by in self.sensitivity.items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path | None = None) -> Analysis:
        return cls(
            model_name=data["model"]["name"],
            fingerprint=data["model"]["fingerprint"],
            calibration=data["calibration"],
            settings=data["settings"],
            shapes={n: (int(s[0]), int(s[1])) for n, s in data["shapes"].items()},
            sensitivity={n: {int(b): float(v) for b, v in by.items()} for n, by in data["sensitivity"].items()},
            kind=data["sensitivity_kind"],
            seconds=data["seconds"],
            directory=directory,
        )

    def load_fisher(self) -> dict[str, np.ndarray]:
        if self.fisher is None:
            from safetensors.numpy import load_file

            self.fisher = load_file(str(self.directory / "fisher.safetensors"))
        return self.fisher


def analysis_settings(settings: CompressSettings, widths: Sequence[int] = BIT_WIDTHS) -> dict[str, Any]:
    """The settings an analysis's numbers depend on (its cache key, with the model and the text)."""
    out = {
        "seq_len": settings.seq_len,
        "calibration_start": settings.calibration_start,
        "calibration_tokens": settings.calibration_tokens,
        "group_rows": settings.group_rows,
        "per_row_scale": settings.per_row_scale,
        "widths": list(widths),
        "sensitivity": settings.sensitivity,
    }
    if settings.sensitivity == "measured":
        out["measure_tokens"] = settings.measure_tokens
    return out


def analysis_directory(fingerprint: str, calibration_sha256: str, settings: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps([calibration_sha256, settings, ANALYSIS_VERSION], sort_keys=True).encode())
    return cache_dir() / "compress" / f"{fingerprint}-{key.hexdigest()[:16]}"


def cached_analysis(fingerprint: str, calibration_sha256: str, settings: dict[str, Any]) -> Analysis | None:
    """The cached analysis for these inputs, or None (a damaged cache entry counts as none)."""
    directory = analysis_directory(fingerprint, calibration_sha256, settings)
    try:
        data = json.loads((directory / "analysis.json").read_text())
        if data.get("format") != ANALYSIS_FORMAT or data.get("version") != ANALYSIS_VERSION:
            return None
        if not (directory / "fisher.safetensors").is_file():
            return None
        return Analysis.from_json(data, directory)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_analyses(model_name: str | None = None) -> list[Analysis]:
    """Every cached analysis (of ``model_name`` only, if given), newest first, without loading a
    model or its Fisher: reading ``analysis.json`` files is all it costs (Talaria's start)."""
    found = []
    for path in (cache_dir() / "compress").glob("*/analysis.json"):
        try:
            data = json.loads(path.read_text())
            if data.get("format") != ANALYSIS_FORMAT or data.get("version") != ANALYSIS_VERSION:
                continue
            analysis = Analysis.from_json(data, path.parent)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if model_name is None or analysis.model_name == model_name:
            found.append((path.stat().st_mtime, analysis))
    return [analysis for _, analysis in sorted(found, key=lambda pair: -pair[0])]


def _save(analysis: Analysis) -> None:
    from safetensors.numpy import save_file

    from afmkit.files import atomic_directory

    directory = analysis_directory(analysis.fingerprint, analysis.calibration["sha256"], analysis.settings)
    try:
        with atomic_directory(directory) as tmp:
            save_file({n: np.ascontiguousarray(f) for n, f in analysis.fisher.items()}, str(tmp / "fisher.safetensors"))
            (tmp / "analysis.json").write_text(json.dumps(analysis.to_json(), indent=1))
        analysis.directory = directory
    except OSError as exc:  # a full or read-only cache must not stop compression
        import sys

        print(f"afmkit: could not cache the analysis in {directory}: {exc}", file=sys.stderr)


def analyze(
    config: Any,
    params: Mapping[str, Any],
    calibration: Calibration,
    *,
    model_name: str,
    fingerprint: str | None = None,
    settings: CompressSettings = _DEFAULTS,
    widths: Sequence[int] = BIT_WIDTHS,
    use_cache: bool = True,
    quiet: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> Analysis:
    """Fisher information and the sensitivity of every matrix at every width, from the cache
    when an analysis of the same weights, text and settings is there (``use_cache=False``
    recomputes it); a computed analysis is always cached."""
    if settings.sensitivity not in ("proxy", "measured"):
        raise UserError(f"--sensitivity must be proxy or measured, got {settings.sensitivity!r}")
    fingerprint = fingerprint or model_fingerprint(config, params)
    keyed = analysis_settings(settings, widths)
    if use_cache:
        found = cached_analysis(fingerprint, calibration.sha256, keyed)
        if found is not None:
            return found
    seconds: dict[str, float] = {}
    begin = clock()
    fisher = fisher_diagonal(config, params, calibration, quiet=quiet)
    seconds["fisher"] = clock() - begin
    begin = clock()
    common = {
        "widths": widths,
        "group_rows": settings.group_rows,
        "per_row_scale": settings.per_row_scale,
        "quiet": quiet,
    }
    if settings.sensitivity == "proxy":
        sensitivity = proxy_sensitivity(params, fisher, **common)
    else:
        sensitivity = measured_sensitivity(
            config, params, calibration, fisher, measure_tokens=settings.measure_tokens, **common
        )
    seconds["sensitivity"] = clock() - begin
    analysis = Analysis(
        model_name=model_name,
        fingerprint=fingerprint,
        calibration=calibration.info(),
        settings=keyed,
        shapes=matrix_shapes(params),
        sensitivity=sensitivity,
        kind=settings.sensitivity,
        seconds=seconds,
        fisher=fisher,
    )
    _save(analysis)
    return analysis
