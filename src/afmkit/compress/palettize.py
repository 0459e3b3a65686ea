"""Palettization: weights replaced by indices into small look-up tables found by k-means.

``palettize_matrix`` turns one weight into a ``PalettizedWeight`` (``afmkit.model.palettized``):
every group of 16 output rows gets one table of ``2^bits`` values, the optimal weighted 1-D
k-means of the group's weights (``afmkit.compress.kmeans``). With ``per_row_scale`` each output
row is first divided by its largest magnitude, so rows of different ranges share one table, and
the scale is kept to multiply back. With ``importance`` (same shape as the weight: squared
gradients from calibration text, as SqueezeLLM) the k-means minimises the importance-weighted
squared error instead of the plain one.

``palettize_params`` does every layer matrix of a model, with bits chosen per matrix, and stores
the embedding (and an untied output layer) as 8-bit (or 4-bit) integers in blocks of 32
(``afmkit.model.packed``), whose native kernel also serves the output projection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from afmkit.compress.gptq import DAMP, assign_codes, gram_name
from afmkit.compress.kmeans import kmeans1d_groups
from afmkit.errors import UserError
from afmkit.model.packed import INPUT_AXES, PackedWeight, pack
from afmkit.model.palettized import PalettizedWeight, check_layout, from_codes

GROUP_ROWS = 16
EMBEDDINGS = ("embed", "lm_head")
# The matrices of a layer that palettize_params compresses.
LAYER_MATRICES = tuple(name for name in INPUT_AXES if name not in EMBEDDINGS)


def palettize_matrix(
    w: Any,
    bits: int,
    *,
    in_axes: tuple[int, ...] = (0,),
    group_rows: int = GROUP_ROWS,
    per_row_scale: bool = True,
    importance: Any = None,
    gram: Any = None,
    damp: float = DAMP,
) -> PalettizedWeight:
    """One weight palettized to ``bits`` (2, 3, 4 or 8) per index.

    ``w`` is laid out as afmkit stores it: its ``in_axes`` are contracted with the input (a
    ``[in, out]`` matrix by default; ``wo [heads, head_dim, d]`` has ``in_axes=(0, 1)``).
    ``importance``: optional non-negative weights of each entry's squared error, shaped like
    ``w``, for the k-means. ``gram``: optional ``E[x x^T]`` of the weight's inputs ``[K, K]``
    (``afmkit.compress.gptq.InputGrams``); with it the indices into the k-means tables are chosen
    by GPTQ's error feedback (``damp``: its diagonal loading) instead of nearest value."""
    w = np.asarray(w, dtype=np.float32)
    shape, in_axes = tuple(w.shape), tuple(in_axes)
    check_layout(shape, in_axes, bits, group_rows)
    matrix = _as_matrix(w, in_axes)  # [K, N]
    k, n = matrix.shape
    importance_matrix = None
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32)
        if importance.shape != shape:
            raise UserError(f"importance has shape {importance.shape}; it must match the weight's {shape}")
        importance_matrix = _as_matrix(importance, in_axes).astype(np.float64)
    scales = None
    values = matrix.astype(np.float64)
    if per_row_scale:
        # The scale is stored in fp16, so cluster against the stored value.
        scales = np.abs(matrix).max(axis=0).astype(np.float16)
        scales = np.where(scales == 0, np.float16(1), scales)
        if not np.all(np.isfinite(scales)):
            raise UserError("a weight row is too large for an fp16 scale; palettize without per_row_scale")
        values = values / scales.astype(np.float64)
        if importance_matrix is not None:
            # an error e in the scaled value is an error e * scale in the weight
            importance_matrix = importance_matrix * np.square(scales.astype(np.float64))[None, :]
    groups = n // group_rows
    # [K, N] -> [groups, K * group_rows]: all weights of a group's output rows together
    grouped = values.reshape(k, groups, group_rows).transpose(1, 0, 2).reshape(groups, -1)
    grouped_importance = (
        None
        if importance_matrix is None
        else importance_matrix.reshape(k, groups, group_rows).transpose(1, 0, 2).reshape(groups, -1)
    )
    centroids, labels = kmeans1d_groups(grouped, 2**bits, grouped_importance)
    tables = centroids.astype(np.float16)
    if not np.all(np.isfinite(tables)):
        raise UserError("a weight is too large for fp16 look-up tables; keep this model in float32")
    codes = labels.reshape(groups, k, group_rows).transpose(1, 0, 2).reshape(k, n)
    if gram is not None:
        gram = np.asarray(gram)
        if gram.shape != (k, k):
            raise UserError(f"the input Gram matrix has shape {gram.shape}; this weight has {k} inputs, so ({k}, {k})")
        # rows scaled by 1/scale round the same way: each output's feedback is its own
        grid = tables.astype(np.float64)[np.arange(n) // group_rows]
        codes = assign_codes(values, grid, gram, damp=damp)
    return from_codes(codes, tables, scales, bits=bits, shape=shape, in_axes=in_axes)


def _as_matrix(w: np.ndarray, in_axes: tuple[int, ...]) -> np.ndarray:
    outs = tuple(a for a in range(w.ndim) if a not in in_axes)
    return w.transpose(in_axes + outs).reshape(math.prod(w.shape[a] for a in in_axes), -1)


def palettize_params(
    params: dict[str, Any],
    bits_per_matrix: dict[str, int] | int,
    *,
    embed_bits: int = 8,
    group_rows: int = GROUP_ROWS,
    per_row_scale: bool = True,
    importance: Mapping[str, Any] | None = None,
    grams: Mapping[str, Any] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """The weights with every layer matrix palettized.

    ``bits_per_matrix``: one bit width for all, or one per matrix by name (``layers.3.w_down``);
    a matrix the dict leaves out stays fp32. ``embed_bits`` (8 or 4): the embedding (and an untied
    ``lm_head``) as integers in blocks of 32 inputs with an fp16 scale each. ``importance``:
    optional per-matrix importance (see ``palettize_matrix``), by the same names (any mapping:
    one made on demand keeps a single matrix's importance in memory). ``grams``: optional input
    Gram matrices, a ``gptq.InputGrams`` (by its names, ``layers.3.mlp_in``; read layer by layer):
    indices are then chosen with error feedback (see ``palettize_matrix``). ``progress``: a
    ``ProgressReporter``, advanced once per matrix. Norm scales stay fp32."""
    if embed_bits not in (4, 8):
        raise UserError(f"the embedding is stored with 8 or 4 bits, not {embed_bits}")
    names = [f"layers.{i}.{m}" for i, layer in enumerate(params["layers"]) for m in LAYER_MATRICES if m in layer]
    if isinstance(bits_per_matrix, dict):
        unknown = sorted(set(bits_per_matrix) - set(names))
        if unknown:
            raise UserError(
                f"no layer matrix named {', '.join(unknown[:3])} in this model; names look like "
                f"layers.0.wq (matrices: {', '.join(LAYER_MATRICES)})"
            )
        bits_of = dict(bits_per_matrix)
    else:
        bits_of = dict.fromkeys(names, bits_per_matrix)
    unknown = sorted(set(importance or {}) - set(names))
    if unknown:
        raise UserError(f"importance given for {', '.join(unknown[:3])}, which is not a layer matrix of this model")
    out = {name: w for name, w in params.items() if name != "layers"}
    for name in EMBEDDINGS:
        if name in out and not (isinstance(out[name], PackedWeight) and out[name].bits == embed_bits):
            out[name] = pack(_float(out[name]), embed_bits, INPUT_AXES[name])
    layers = []
    for i, layer in enumerate(params["layers"]):
        new = dict(layer)
        for matrix in LAYER_MATRICES:
            name = f"layers.{i}.{matrix}"
            if name in bits_of:
                new[matrix] = palettize_matrix(
                    _float(layer[matrix]),
                    bits_of[name],
                    in_axes=INPUT_AXES[matrix],
                    group_rows=group_rows,
                    per_row_scale=per_row_scale,
                    importance=None if importance is None else importance.get(name),
                    gram=None if grams is None else grams[gram_name(name)],
                )
                if progress is not None:
                    progress.advance(1)
        layers.append(new)
    out["layers"] = layers
    for name, w in out.items():
        if name not in EMBEDDINGS and name != "layers":
            out[name] = jnp.asarray(w, jnp.float32)
    return out


def _float(w: Any) -> Any:
    """A weight's values (a packed int4/int8 weight, as from ``afmkit.load()`` on CPUs, dequantized)."""
    return w.dequantize() if isinstance(w, PackedWeight) else w


def bits_per_weight(params: dict[str, Any]) -> float:
    """Average storage bits per weight over the layer matrices, the figure a bit budget is about:
    everything a matrix stores (indices, tables, scales; a packed weight's codes and block scales;
    a plain array's dtype) over its number of weights."""
    stored = total = 0
    for layer in params["layers"]:
        for matrix in LAYER_MATRICES:
            w = layer.get(matrix)
            if w is None:
                continue
            size = math.prod(w.shape)
            if isinstance(w, PalettizedWeight):
                stored += w.bits_per_weight * size
            elif isinstance(w, PackedWeight):
                stored += w.packed.size * 8 + w.scales.size * 16
            else:
                stored += jnp.dtype(w.dtype).itemsize * 8 * size
            total += size
    return stored / total


def checkpoint_bits(directory: Any) -> dict[str, float] | None:
    """``bits_per_weight``'s figures for a saved compressed model, read from its files' headers
    (nothing loaded): the layer matrices, the embedding, and every weight (norm scales counted at
    their dtype). None for a checkpoint without compressed weights."""
    from pathlib import Path

    from afmkit.errors import CorruptFileError
    from afmkit.interop import native
    from afmkit.model.transformer import abstract_params

    directory = Path(directory)
    meta = native._read_meta(directory)
    if not meta.get("quantized"):
        return None
    reader = native.SafetensorsReader(directory / "model.safetensors")
    config = native.read_config(directory)
    sums = {"matrices": [0, 0], "embedding": [0, 0], "all_weights": [0, 0]}
    for name, spec in native._flatten(abstract_params(config)).items():
        size = math.prod(spec.shape)
        parts = [key for key in reader.entries if key == name or key.startswith(f"{name}.")]
        try:
            stored = sum(
                8 * (reader.entries[key]["data_offsets"][1] - reader.entries[key]["data_offsets"][0]) for key in parts
            )
        except (KeyError, TypeError, IndexError):
            raise CorruptFileError(
                f"{reader.path}: {name} has an unreadable entry; the checkpoint is damaged"
            ) from None
        kind = name.rsplit(".", 1)[-1]
        groups = ["all_weights"] + (
            ["matrices"] if kind in LAYER_MATRICES else ["embedding"] if kind in EMBEDDINGS else []
        )
        for group in groups:
            sums[group][0] += stored
            sums[group][1] += size
    return {group: stored / count for group, (stored, count) in sums.items() if count}
