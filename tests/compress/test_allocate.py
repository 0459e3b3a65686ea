"""Bit allocation: the multiple-choice knapsack against brute force, the storage accounting
against a count written out by hand, and the refusals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from afmkit.compress.allocate import (
    achievable_range,
    allocate_bits,
    bits_per_weight,
    matrix_storage_bits,
    solve_multiple_choice_knapsack,
)
from afmkit.errors import UserError


def brute_force(costs, values, budget):
    best = math.inf
    for picks in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[j] for c, j in zip(costs, picks)) <= budget:
            best = min(best, sum(v[j] for v, j in zip(values, picks)))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    items = int(rng.integers(1, 7))
    costs = [sorted(rng.integers(1, 60, size=4).tolist()) for _ in range(items)]
    # values that do not simply fall with cost, so greedy orderings can go wrong
    values = [rng.exponential(1.0, size=4).tolist() for _ in range(items)]
    low, high = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = int(rng.integers(low, high + 1))
    picks, exact = solve_multiple_choice_knapsack(costs, values, budget)
    assert exact
    assert sum(c[j] for c, j in zip(costs, picks)) <= budget
    assert sum(v[j] for v, j in zip(values, picks)) == pytest.approx(brute_force(costs, values, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_knapsack_with_rounded_costs_still_meets_the_budget(seed):
    rng = np.random.default_rng(100 + seed)
    costs = [sorted(rng.integers(1, 10_000, size=3).tolist()) for _ in range(5)]
    values = [rng.exponential(1.0, size=3).tolist() for _ in range(5)]
    budget = int(np.mean([sum(min(c) for c in costs), sum(max(c) for c in costs)]))
    picks, exact = solve_multiple_choice_knapsack(costs, values, budget, max_states=16)
    assert not exact
    assert sum(c[j] for c, j in zip(costs, picks)) <= budget
    # never better than the true optimum (it is a feasible point)
    assert sum(v[j] for v, j in zip(values, picks)) >= brute_force(costs, values, budget) - 1e-12


def test_storage_accounting_counts_indices_tables_and_scales():
    # a 576 x 1536 matrix (gate_proj) at 2 bits, 16-row groups, per-row scales, written out:
    indices = 2 * 576 * 1536
    tables = (1536 // 16) * 4 * 16  # 96 tables of 4 fp16 entries
    scales = 1536 * 16
    assert matrix_storage_bits(576, 1536, 2, group_rows=16, per_row_scale=True) == indices + tables + scales
    assert matrix_storage_bits(576, 1536, 2, group_rows=16, per_row_scale=False) == indices + tables
    # a partial last group still has a whole table
    assert matrix_storage_bits(8, 17, 3, group_rows=16, per_row_scale=False) == 3 * 8 * 17 + 2 * 8 * 16


SMOLLM2_TYPES = {
    "wq": (576, 576),
    "wk": (576, 192),
    "wv": (576, 192),
    "wo": (576, 576),
    "w_gate": (576, 1536),
    "w_up": (576, 1536),
    "w_down": (1536, 576),
}


def smollm2_shapes(layers=30):
    return {f"layers.{i}.{kind}": shape for i in range(layers) for kind, shape in SMOLLM2_TYPES.items()}


def test_allocation_on_smollm2_shapes_meets_the_budget_and_spends_it_where_it_matters():
    shapes = smollm2_shapes()
    rng = np.random.default_rng(0)
    # sensitivity falls ~4x per extra bit (error ~ 2^-2b); w_down 10x more sensitive than the rest
    sensitivity = {
        name: {b: (10.0 if name.endswith("w_down") else 1.0) * rng.uniform(0.5, 2) * 4.0 ** (-b) for b in (2, 3, 4, 8)}
        for name in shapes
    }
    allocation = allocate_bits(shapes, sensitivity, 3.5, group_rows=16, per_row_scale=True)
    assert allocation.exact
    assert 3.5 - 0.01 < allocation.bits_per_weight <= 3.5
    assert allocation.bits_per_weight == pytest.approx(
        bits_per_weight(shapes, allocation.bits, group_rows=16, per_row_scale=True)
    )
    down = [b for n, b in allocation.bits.items() if n.endswith("w_down")]
    gate = [b for n, b in allocation.bits.items() if n.endswith("w_gate")]
    assert np.mean(down) > np.mean(gate)
    # a uniform 3-bit choice has the same budget class; the optimum cannot be worse than it
    uniform3 = sum(s[3] for s in sensitivity.values())
    if bits_per_weight(shapes, dict.fromkeys(shapes, 3), group_rows=16, per_row_scale=True) <= 3.5:
        assert allocation.predicted_sensitivity <= uniform3


def test_budget_outside_the_achievable_range_is_one_line_naming_both_ends():
    shapes = smollm2_shapes(2)
    sensitivity = {n: {b: 1.0 / b for b in (2, 3, 4, 8)} for n in shapes}
    lo, hi = achievable_range(shapes, group_rows=16, per_row_scale=True)
    assert 2 < lo < 2.1 and 8 < hi < 8.5
    for budget in (1.5, 9.0):
        with pytest.raises(UserError) as err:
            allocate_bits(shapes, sensitivity, budget, group_rows=16, per_row_scale=True)
        message = str(err.value)
        assert "\n" not in message and f"{lo:.4f}" in message and f"{hi:.4f}" in message
    with pytest.raises(UserError, match="must be positive"):
        allocate_bits(shapes, sensitivity, 0, group_rows=16, per_row_scale=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_row_scale", [True, False])
def test_accounting_matches_what_a_palettized_weight_stores(bits, per_row_scale):
    from afmkit.compress.palettize import palettize_matrix

    w = np.random.default_rng(bits).normal(size=(32, 2, 24)).astype(np.float32)  # K=32, N=48: 3 groups
    stored = palettize_matrix(w, bits, per_row_scale=per_row_scale)
    assert stored.bits_per_weight * w.size == matrix_storage_bits(
        32, 48, bits, group_rows=16, per_row_scale=per_row_scale
    )
