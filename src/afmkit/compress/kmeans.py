"""Exact (globally optimal) weighted k-means in one dimension.

The clusters of an optimal 1-D k-means are contiguous runs of the sorted values, so the optimum
is found exactly by a dynamic programme over split points (``kmeans.cc`` explains it). Lloyd's
iterations only find a local optimum, and for palettizing a small model that difference is
large (the issue's measurement: perplexity 80 against 237 at 4 bits).

The fast path is ``kmeans.cc``, compiled on first use like the CPU kernels (``afmkit.kernels``:
same compiler, cache and ``AFMKIT_KERNELS=0`` switch); it runs the groups of a matrix in parallel
threads, O(k n log n) each. Without a compiler the same programme runs in numpy: exact
too, and vectorised across groups, but several times slower. Both paths give the same bits on
every CPU (``kmeans.cc`` says why); ``afmkit.compress.named`` relies on it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import numpy as np

from afmkit.errors import UserError

SOURCE = Path(__file__).with_name("kmeans.cc")
# Weights are floored at this fraction of their mean: a value whose importance is zero still
# needs a cluster (and a run of zero-weight values has no weighted mean).
MIN_RELATIVE_WEIGHT = 1e-9


def kmeans1d_optimal(values, k: int, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Optimal k-means of ``values [n]``: ``(centroids [k], labels [n])``.

    Minimises ``sum_i weights[i] * (values[i] - centroids[labels[i]])^2`` exactly. Centroids come
    back ascending (float64) and each value's label is its cluster. With fewer than ``k`` distinct
    values, each distinct value is a centroid and the last one is repeated to fill ``k``."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise UserError(f"kmeans1d_optimal takes a 1-D array of values, not shape {values.shape}")
    centroids, labels = kmeans1d_groups(values[None], k, None if weights is None else np.asarray(weights)[None])
    return centroids[0], labels[0]


def kmeans1d_groups(values, k: int, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Optimal k-means of every row of ``values [groups, n]`` on its own: ``(centroids [groups, k],
    labels [groups, n] int32)`` (see ``kmeans1d_optimal``). Rows run in parallel threads."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        raise UserError(f"k-means takes groups of values [groups, n] with n > 0, not shape {values.shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"k-means needs a positive number of clusters, not {k!r}")
    if not np.all(np.isfinite(values)):
        raise UserError("cannot cluster NaN or infinite weights; the model's weights are damaged")
    groups, n = values.shape
    if n >= 2**31:
        raise UserError(f"a group of {n} values is too large to cluster; use smaller groups")
    weights = _checked_weights(weights, values.shape)
    order = np.argsort(values, axis=1, kind="stable")
    sorted_values = np.ascontiguousarray(np.take_along_axis(values, order, axis=1))
    sorted_weights = np.ascontiguousarray(np.take_along_axis(weights, order, axis=1))
    library = _library()
    if library is not None:
        centroids = np.empty((groups, k), np.float64)
        bounds = np.empty((groups, k + 1), np.int32)
        library.AfmkitKmeans1d(
            _pointer(sorted_values),
            _pointer(sorted_weights),
            ctypes.c_int64(groups),
            ctypes.c_int64(n),
            ctypes.c_int64(k),
            ctypes.c_int64(_threads()),
            _pointer(centroids),
            _pointer(bounds),
        )
    else:
        centroids, bounds = _groups_numpy(sorted_values, sorted_weights, k)
    # Means of consecutive runs of sorted values ascend; rounding (runs of one repeated value) can
    # put two of them an ulp out of order.
    centroids = np.maximum.accumulate(centroids, axis=1)
    # cluster of each sorted position, then back to the original order
    counts = np.diff(bounds.astype(np.int64), axis=1)
    sorted_labels = np.repeat(np.tile(np.arange(k, dtype=np.int32), groups), counts.reshape(-1)).reshape(groups, n)
    labels = np.empty((groups, n), np.int32)
    np.put_along_axis(labels, order, sorted_labels, axis=1)
    return centroids, labels


def _checked_weights(weights, shape: tuple[int, ...]) -> np.ndarray:
    if weights is None:
        return np.ones(shape, np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != shape:
        raise UserError(f"k-means weights have shape {weights.shape}; they must match the values' {shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise UserError("k-means weights (importance) must be finite and non-negative")
    # the mean from an in-order sum: the same bits on every CPU and numpy build (the floor decides weights)
    mean = np.cumsum(weights, axis=1)[:, -1:] / shape[1]
    floor = np.where(mean > 0, mean * MIN_RELATIVE_WEIGHT, 1.0)
    return np.maximum(weights, floor)


def _groups_numpy(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``kmeans.cc``'s programme in numpy, the fallback without a compiler: the same divide and
    conquer, one recursion level of every group at a time, and the same floating-point operations
    in the same order (sequential prefix sums, the same cost expression, the first best split), so
    the two paths give identical bits. Inputs sorted; returns centroids and bounds."""
    groups, n = values.shape
    if n <= k:  # every value its own cluster; the clusters left over are empty
        picks = np.minimum(np.arange(k), n - 1)
        return values[:, picks], np.tile(np.minimum(np.arange(k + 1), n), (groups, 1)).astype(np.int32)
    # Bound the split-point table (k x groups x n) by doing a few groups at a time.
    step = max(1, 20_000_000 // (k * (n + 1)))
    parts = [_chunk_numpy(values[g : g + step], weights[g : g + step], k) for g in range(0, groups, step)]
    return np.concatenate([c for c, _ in parts]), np.concatenate([b for _, b in parts])


def _chunk_numpy(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    groups, n = values.shape
    # ``np.cumsum`` adds in order, as kmeans.cc's loops do (``sum`` would add pairwise)
    mean = np.cumsum(weights * values, axis=1)[:, -1:] / np.cumsum(weights, axis=1)[:, -1:]
    x = values - mean
    zero = np.zeros((groups, 1))
    pw = np.concatenate([zero, np.cumsum(weights, axis=1)], axis=1)
    pwx = np.concatenate([zero, np.cumsum(weights * x, axis=1)], axis=1)
    pwxx = np.concatenate([zero, np.cumsum(weights * x * x, axis=1)], axis=1)

    def cost(g: np.ndarray, m: np.ndarray, i: np.ndarray) -> np.ndarray:
        total = pwx[g, i] - pwx[g, m]
        return (pwxx[g, i] - pwxx[g, m]) - total * total / (pw[g, i] - pw[g, m])

    every = np.arange(groups)
    prev = np.full((groups, n + 1), np.inf)
    prev[:, 1:] = cost(every[:, None], np.zeros((1, n), np.int64), np.arange(1, n + 1)[None, :])
    arg = np.zeros((k, groups, n + 1), np.int32)
    for j in range(1, k):
        hi = n if j == k - 1 else n - (k - j - 1)
        lo = n if j == k - 1 else j + 1
        cur = np.full((groups, n + 1), np.inf)
        # one node per group: rows [lo, hi] whose best split lies in [opt_lo, opt_hi]
        g, rows_lo, rows_hi = every, np.full(groups, lo), np.full(groups, hi)
        opt_lo, opt_hi = np.full(groups, j), np.full(groups, hi - 1)
        while len(g):
            mid = (rows_lo + rows_hi) // 2
            count = np.minimum(opt_hi, mid - 1) - opt_lo + 1
            starts = np.concatenate([[0], np.cumsum(count)[:-1]])
            node = np.repeat(np.arange(len(g)), count)
            m = opt_lo[node] + np.arange(count.sum()) - starts[node]
            candidates = prev[g[node], m] + cost(g[node], m, mid[node])
            best = np.minimum.reduceat(candidates, starts)
            # the first split point reaching the minimum, as the C++ loop keeps
            position = np.where(candidates == best[node], np.arange(len(m)), len(m))
            best_m = m[np.minimum.reduceat(position, starts)]
            cur[g, mid] = best
            arg[j, g, mid] = best_m
            left, right = rows_lo <= mid - 1, mid + 1 <= rows_hi
            g, rows_lo, rows_hi, opt_lo, opt_hi = (
                np.concatenate([g[left], g[right]]),
                np.concatenate([rows_lo[left], mid[right] + 1]),
                np.concatenate([mid[left] - 1, rows_hi[right]]),
                np.concatenate([opt_lo[left], best_m[right]]),
                np.concatenate([best_m[left], opt_hi[right]]),
            )
        prev = cur
    cut = np.zeros((groups, k + 1), np.int64)
    cut[:, k] = n
    for j in range(k - 1, 0, -1):
        cut[:, j] = arg[j, every, cut[:, j + 1]]
    g = every[:, None]
    centroids = (pwx[g, cut[:, 1:]] - pwx[g, cut[:, :-1]]) / (pw[g, cut[:, 1:]] - pw[g, cut[:, :-1]]) + mean
    return centroids, cut.astype(np.int32)


def _pointer(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled ``kmeans.cc`` (None without a compiler or with ``AFMKIT_KERNELS=0``)."""
    from afmkit import kernels

    if os.environ.get("AFMKIT_KERNELS", "1") == "0":
        return None
    compiler = kernels._compiler()
    if compiler is None:
        print("afmkit: no C++ compiler found; k-means runs in numpy (slower)", file=sys.stderr)
        return None
    try:
        library = ctypes.cdll.LoadLibrary(str(kernels.build(compiler, SOURCE)))
    except (OSError, RuntimeError) as exc:
        print(f"afmkit: could not build the k-means routine, using numpy (slow): {exc}", file=sys.stderr)
        return None
    library.AfmkitKmeans1d.restype = None
    library.AfmkitKmeans1d.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2
    return library
