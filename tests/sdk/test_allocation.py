"""Precision assignment: budget respected, and near the brute-force optimum of the multiple-choice knapsack."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from lowra.sdk.allocation import assign_precision, lower_hull
from lowra.sdk.errors import BudgetError


def brute_force(costs, dists, budget):
    best = (np.inf, None)
    for choice in itertools.product(*[range(costs.shape[1])] * costs.shape[0]):
        c = sum(costs[i, j] for i, j in enumerate(choice))
        if c <= budget:
            d = sum(dists[i, j] for i, j in enumerate(choice))
            best = min(best, (d, choice))
    return best


def channel_options(rng, n):
    """Realistic options: widths 0,1,2,4 at cost w*L + codebook, distortion var * gaussian MSE(w)."""
    mse = np.array([1.0, 0.3634, 0.1175, 0.0095])
    var = rng.lognormal(0, 1.5, n)
    lengths = rng.choice([16, 48], n)
    costs = np.stack([np.zeros(n)] + [w * lengths + 16 * 2**w for w in (1, 2, 4)], 1)
    return costs, var[:, None] * lengths[:, None] * mse[None, :]


@pytest.mark.parametrize("seed", range(6))
def test_near_optimal_on_small_instances(seed):
    rng = np.random.default_rng(seed)
    costs, dists = channel_options(rng, 6)
    budget = float(rng.uniform(0.2, 0.8) * costs[:, -1].sum())
    choice = assign_precision(costs, dists, budget)
    spent = costs[np.arange(6), choice].sum()
    got = dists[np.arange(6), choice].sum()
    opt, _ = brute_force(costs, dists, budget)
    assert spent <= budget
    assert got <= opt * 1.15  # greedy on hulls: exact at hull breakpoints, small gap in between


def test_exact_at_hull_breakpoints():
    costs = np.array([[0, 10, 20], [0, 10, 20]], dtype=float)
    dists = np.array([[100, 30, 20], [50, 20, 15]], dtype=float)
    # best first step: item 0 (saves 70 for 10), then item 1 (30 for 10), then item 0 again (10 for 10)
    assert assign_precision(costs, dists, 10).tolist() == [1, 0]
    assert assign_precision(costs, dists, 20).tolist() == [1, 1]
    assert assign_precision(costs, dists, 30).tolist() == [2, 1]


def test_hull_drops_dominated_options():
    assert lower_hull(np.array([0, 5, 10, 12.0]), np.array([10, 9, 2, 3.0])) == [0, 2]


def test_budget_below_minimum():
    with pytest.raises(BudgetError, match="below the cheapest"):
        assign_precision(np.array([[5.0, 10.0]]), np.array([[1.0, 0.5]]), 4)
