"""Bits per matrix under a bits-per-weight budget, minimising the total predicted sensitivity.

**Accounting.** The budget is the average over every linear-layer weight (the seven matrices of
each layer: q, k, v, o, gate, up, down) of the bits stored for them, tables and scales included.
A matrix with ``K`` inputs and ``N`` outputs palettized at ``b`` bits stores

* ``b * K * N`` bits of indices,
* one table of ``2**b`` fp16 entries per group of ``group_rows`` outputs:
  ``ceil(N / group_rows) * 2**b * 16`` bits,
* with ``per_row_scale``, one fp16 scale per output: ``N * 16`` bits.

The embedding (also the tied output layer) is not a linear-layer weight: it is stored at
``embed_bits`` and reported on its own. Norm scales stay fp32 and count in neither.

**Method.** Choosing one bit width per matrix so that the summed cost meets the budget and the
summed sensitivity is least is a multiple-choice knapsack. It is solved exactly by dynamic
programming over the cost above the all-cheapest choice, counted in units of the greatest common
divisor of the cost steps. When that would need more than ``max_states`` states, every cost step
is rounded *up* to a coarser unit: the answer still meets the budget (its true cost is at most
the rounded one) and is optimal among allocations whose rounded cost fits; ``Allocation.exact``
says which case ran. For SmolLM2-135M the rounding unit is a few hundred bits against cost steps
of 100,000 bits or more, so at most a few hundred bits of the budget go unused.

Sensitivities are taken as additive across matrices (each was measured with the others float),
the usual assumption of mixed-precision allocation (HAWQ, SqueezeLLM's and coremltools'
per-layer sensitivity).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from afmkit.errors import UserError

BIT_WIDTHS = (2, 3, 4, 8)  # the widths a matrix may take (issue 13)
TABLE_ENTRY_BITS = 16  # fp16 look-up table entries
SCALE_BITS = 16  # fp16 per-row scales
MAX_STATES = 1 << 18  # DP states; 210 matrices x 2^18 choices is 55 MB of backtracking bytes


def matrix_storage_bits(k: int, n: int, bits: int, *, group_rows: int, per_row_scale: bool) -> int:
    """Bits stored for a ``K x N`` matrix palettized at ``bits`` (see the module docstring)."""
    tables = math.ceil(n / group_rows) * (2**bits) * TABLE_ENTRY_BITS
    scales = n * SCALE_BITS if per_row_scale else 0
    return bits * k * n + tables + scales


@dataclasses.dataclass(frozen=True)
class Allocation:
    bits: dict[str, int]  # matrix name -> bits
    bits_per_weight: float  # average over the matrices' weights, tables and scales counted
    predicted_sensitivity: float  # sum of the chosen widths' sensitivities
    exact: bool  # True when the DP ran on exact costs (no rounding)


def bits_per_weight(
    shapes: Mapping[str, tuple[int, int]], bits: Mapping[str, int], *, group_rows: int, per_row_scale: bool
) -> float:
    """Average stored bits per weight of ``shapes`` (name -> (K, N)) at ``bits`` per matrix."""
    total = sum(
        matrix_storage_bits(k, n, bits[name], group_rows=group_rows, per_row_scale=per_row_scale)
        for name, (k, n) in shapes.items()
    )
    return total / sum(k * n for k, n in shapes.values())


def achievable_range(
    shapes: Mapping[str, tuple[int, int]], *, group_rows: int, per_row_scale: bool, widths: Sequence[int] = BIT_WIDTHS
) -> tuple[float, float]:
    """The least and greatest bits per weight any allocation over ``widths`` gives."""
    lo = bits_per_weight(shapes, dict.fromkeys(shapes, min(widths)), group_rows=group_rows, per_row_scale=per_row_scale)
    hi = bits_per_weight(shapes, dict.fromkeys(shapes, max(widths)), group_rows=group_rows, per_row_scale=per_row_scale)
    return lo, hi


def solve_multiple_choice_knapsack(
    costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int, *, max_states: int = MAX_STATES
) -> tuple[list[int], bool]:
    """One option per item with ``sum(cost) <= budget`` and the least ``sum(value)``.

    Returns the chosen option of each item and whether the costs were exact (see the module
    docstring for the rounding). Raises ``ValueError`` when even the cheapest options exceed the
    budget."""
    costs = [np.asarray(c, np.int64) for c in costs]
    values = [np.asarray(v, np.float64) for v in values]
    base = sum(int(c.min()) for c in costs)
    room = budget - base
    if room < 0:
        raise ValueError(f"the cheapest choice costs {base}, above the budget {budget}")
    steps = [c - c.min() for c in costs]
    unit = math.gcd(*[int(s) for step in steps for s in step if s > 0]) or 1
    exact = room // unit <= max_states
    if not exact:
        unit = math.ceil(room / max_states)
    n_states = room // unit + 1
    # best[s]: least value of the items so far with rounded extra cost at most s (monotone in s)
    best = np.zeros(n_states)
    choice = np.zeros((len(costs), n_states), np.uint8)
    for i, (step, value) in enumerate(zip(steps, values)):
        units = -(-step // unit)  # rounded up; exact when unit divides every step
        new = np.full(n_states, np.inf)
        for j, (u, v) in enumerate(zip(units, value)):
            if u >= n_states:
                continue
            candidate = np.full(n_states, np.inf)
            candidate[u:] = best[: n_states - u] + v
            better = candidate < new
            new[better] = candidate[better]
            choice[i, better] = j
        best = new
    picks = [0] * len(costs)
    s = n_states - 1
    for i in range(len(costs) - 1, -1, -1):
        j = int(choice[i, s])
        picks[i] = j
        s -= int(-(-steps[i][j] // unit))
    return picks, exact


def allocate_bits(
    shapes: Mapping[str, tuple[int, int]],
    sensitivity: Mapping[str, Mapping[int, float]],
    budget_bits_per_weight: float,
    *,
    group_rows: int,
    per_row_scale: bool,
    widths: Sequence[int] = BIT_WIDTHS,
    max_states: int = MAX_STATES,
) -> Allocation:
    """Bits per matrix whose average (``bits_per_weight``) is at most the budget and whose summed
    ``sensitivity[name][bits]`` is least. A budget outside what ``widths`` can reach is refused."""
    if not budget_bits_per_weight > 0:
        raise UserError(f"--bits-per-weight must be positive, got {budget_bits_per_weight:g}")
    lo, hi = achievable_range(shapes, group_rows=group_rows, per_row_scale=per_row_scale, widths=widths)
    if not lo <= budget_bits_per_weight <= hi:
        raise UserError(
            f"no allocation has {budget_bits_per_weight:g} bits per weight: with {group_rows}-row tables"
            f"{' and per-row scales' if per_row_scale else ''} this model reaches {lo:.4f} (all {min(widths)}-bit) "
            f"to {hi:.4f} (all {max(widths)}-bit); pick a budget in that range"
        )
    missing = [name for name in shapes if name not in sensitivity or any(b not in sensitivity[name] for b in widths)]
    if missing:
        raise UserError(f"no sensitivity for {missing[0]} at every width {tuple(widths)}; analyse the model again")
    names = list(shapes)
    storage = [
        [matrix_storage_bits(*shapes[n], b, group_rows=group_rows, per_row_scale=per_row_scale) for b in widths]
        for n in names
    ]
    values = [[float(sensitivity[n][b]) for b in widths] for n in names]
    total_weights = sum(k * n for k, n in shapes.values())
    budget = math.floor(budget_bits_per_weight * total_weights)
    picks, exact = solve_multiple_choice_knapsack(storage, values, budget, max_states=max_states)
    bits = {n: widths[j] for n, j in zip(names, picks)}
    return Allocation(
        bits=bits,
        bits_per_weight=bits_per_weight(shapes, bits, group_rows=group_rows, per_row_scale=per_row_scale),
        predicted_sensitivity=sum(values[i][j] for i, j in enumerate(picks)),
        exact=exact,
    )
