"""Table indices chosen with error feedback (GPTQ's update, Frantar et al. 2022, on fixed tables).

Rounding every weight to its nearest table entry minimises each weight's own error. What the
model sees is the layer's output, ``x @ W`` over calibration inputs ``x``, whose squared error is
``sum_n (w_n - q_n)^T H (w_n - q_n)`` with ``H = E[x x^T]`` (``InputGrams``). GPTQ rounds one
input row ``k`` at a time and moves the rows not yet rounded to cancel the output error it made:
with ``U`` the upper Cholesky factor of ``H^-1``,

    e = (w_k - q_k) / U[k, k];   w_j -= U[k, j] * e   for every later row j.

The tables and scales stay the k-means ones (``afmkit.compress.palettize``); only the indices
change, so the stored format, the kernels and the bits per weight are exactly as before. Rows are
taken in order of decreasing ``H[k, k]`` (GPTQ's "act order": the inputs that carry most signal
are rounded first, while many rows are left to absorb their error), and ``H`` gets
``damp * mean(diag H)`` on its diagonal so the inverse exists.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afmkit.model.transformer import forward
from afmkit.progress import ProgressReporter

# The input each layer matrix reads; matrices that read the same input share one Gram matrix.
MATRIX_INPUT = {
    "wq": "attention_in",
    "wk": "attention_in",
    "wv": "attention_in",
    "wo": "attention_out",
    "w_gate": "mlp_in",
    "w_up": "mlp_in",
    "w_down": "mlp_hidden",
}
MAX_BYTES = 2**30  # Gram matrices held at once (one pass over the calibration windows fills them)
DAMP = 0.01  # diagonal loading, a share of the mean input power (GPTQ's default)
BLOCK = 128  # rows rounded between two matrix updates of the rest (the result does not depend on it)


def gram_name(matrix_name: str) -> str:
    """``layers.3.w_up`` -> ``layers.3.mlp_in``: the key of that matrix's input in ``InputGrams``."""
    layer, _, matrix = matrix_name.rpartition(".")
    return f"{layer}.{MATRIX_INPUT[matrix]}"


class _CaptureInputs:
    """Plays a LoRA adapter (``forward``'s ``adapters``) whose update of every matrix is zero and
    which records the inputs of the matrices of ``layers``, flattened to ``[tokens, K]``: the
    model's own forward pass reports what each linear layer reads, with no second copy of the
    transformer."""

    def __init__(self, layers: range) -> None:
        self.layers = layers
        self.inputs: dict[str, jax.Array] = {}

    def layer(self, index: int) -> dict[str, Any] | None:
        if index not in self.layers:
            return None

        def record(matrix: str) -> Any:
            def update(spec: str, x: jax.Array) -> jax.Array:
                batch_axes = 2  # [batch, seq, *input axes]
                flat = x.reshape(-1, math.prod(x.shape[batch_axes:])).astype(jnp.float32)
                self.inputs.setdefault(f"layers.{index}.{MATRIX_INPUT[matrix]}", flat)
                return jnp.zeros((), x.dtype)

            return update

        return {matrix: record(matrix) for matrix in MATRIX_INPUT}


def _add_grams(totals: dict[str, jax.Array], params: Any, window: jax.Array, layers: range, config: Any) -> Any:
    capture = _CaptureInputs(layers)
    positions = jnp.broadcast_to(jnp.arange(window.shape[1]), window.shape)
    forward(params, window, positions, None, config=config, activation_dtype=jnp.float32, adapters=capture)
    return {name: totals[name] + x.T @ x for name, x in capture.inputs.items()}


def input_sizes(config: Any) -> dict[str, int]:
    """The width of each input kind of a layer."""
    d, attention = config.d_model, config.n_heads * config.head_dim
    return {"attention_in": d, "attention_out": attention, "mlp_in": d, "mlp_hidden": config.d_ff}


class InputGrams(Mapping):
    """``E[x x^T]`` over the tokens of ``windows [n, seq_len]`` for the input of every layer matrix
    (name from ``gram_name`` -> fp32 ``[K, K]``), from the float model's forward pass.

    Computed on first use, as many layers per pass over the windows as fit in ``max_bytes``, and
    only that pass's kept: ``palettize_params`` reads them layer by layer, so a model whose Gram
    matrices together outgrow memory (a 3B model's are about 10 GB) still compresses. SmolLM2's
    (400 MB) take one pass. ``seconds``: the time spent computing them."""

    def __init__(
        self, config: Any, params: Any, windows: np.ndarray, *, max_bytes: int = MAX_BYTES, quiet: bool = False
    ) -> None:
        self.config, self.windows, self.quiet = config, windows, quiet
        self.params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), params)
        sizes = input_sizes(config)
        per_layer = 4 * sum(k * k for k in sizes.values())
        self.layers_per_pass = max(1, min(config.n_layers, max_bytes // per_layer))
        self.names = [f"layers.{i}.{kind}" for i in range(config.n_layers) for kind in sizes]
        self.seconds = 0.0
        self._kept: dict[str, np.ndarray] = {}

    def __iter__(self) -> Any:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._kept:
            if name not in self.names:
                raise KeyError(name)
            first = int(name.split(".")[1]) // self.layers_per_pass * self.layers_per_pass
            self._kept = {}  # free the previous pass's before computing the next
            self._kept = self._compute(range(first, min(first + self.layers_per_pass, self.config.n_layers)))
        return self._kept[name]

    def _compute(self, layers: range) -> dict[str, np.ndarray]:
        begin = time.perf_counter()
        sizes = input_sizes(self.config)
        totals = {f"layers.{i}.{kind}": jnp.zeros((k, k), jnp.float32) for i in layers for kind, k in sizes.items()}
        step = jax.jit(functools.partial(_add_grams, layers=layers, config=self.config), donate_argnums=0)
        label = "input statistics" + (
            "" if len(layers) == self.config.n_layers else f" (layers {layers[0]}-{layers[-1]})"
        )
        with ProgressReporter(label, len(self.windows), unit="windows", quiet=self.quiet) as progress:
            for row in self.windows:
                totals = step(totals, self.params, jnp.asarray(row[None]))
                jax.block_until_ready(totals)
                progress.advance(1, tokens=int(row.size))
        grams = {name: np.asarray(total) / self.windows.size for name, total in totals.items()}
        self.seconds += time.perf_counter() - begin
        return grams


def assign_codes(matrix: np.ndarray, grid: np.ndarray, gram: np.ndarray, *, damp: float) -> np.ndarray:
    """Indices ``[K, N]`` into each output's ``grid [N, levels]`` of values for ``matrix [K, N]``
    (inputs by outputs), rounding input rows one at a time with GPTQ's error feedback under the
    input Gram matrix ``gram [K, K]`` (see the module docstring). float64 throughout."""
    k, n = matrix.shape
    w = np.array(matrix, np.float64)
    h = np.array(gram, np.float64)
    grid = np.asarray(grid, np.float64)
    dead = np.diag(h) <= 0  # inputs that were always zero: any index does, and they absorb nothing
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    columns = np.arange(n)
    codes = np.empty((k, n), np.int64)
    for lo in range(0, k, BLOCK):
        hi = min(lo + BLOCK, k)
        errors = np.empty((hi - lo, n))
        for i in range(lo, hi):
            codes[i] = np.argmin(np.abs(w[i][:, None] - grid), axis=1)
            errors[i - lo] = (w[i] - grid[columns, codes[i]]) / upper[i, i]
            w[i + 1 : hi] -= np.outer(upper[i, i + 1 : hi], errors[i - lo])
        w[hi:] -= upper[lo:hi, hi:].T @ errors
    out = np.empty_like(codes)
    out[order] = codes
    return out


def output_error(matrix: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> float:
    """``E ||x @ (matrix - approx)||^2`` under ``gram = E[x x^T]``: what the indices minimise."""
    diff = np.asarray(matrix, np.float64) - np.asarray(approx, np.float64)
    return float(np.einsum("kn,kl,ln->", diff, np.asarray(gram, np.float64), diff))
