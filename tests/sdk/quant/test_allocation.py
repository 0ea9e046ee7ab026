"""Precision assignment: budget respected, and near the brute-force optimum of the multiple-choice knapsack."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from lowra.sdk.quant import allocation
from lowra.sdk.quant.allocation import _assign_precision_reference, assign_precision, lower_hull
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


# --- the vectorized assign_precision against its plain-Python reference: identical choices, always ----------------


def _running_totals(costs, dists):
    """Every value of ``spent`` the reference passes through with an unlimited budget (its take loop, copied):
    budgets exactly there, and one ulp either side, are where a differently rounded sum would choose otherwise."""
    costs = np.asarray(costs, dtype=np.float64)
    hulls = []
    for c, d in zip(costs, dists):
        idx = np.nonzero(np.isfinite(c))[0]
        hulls.append([int(idx[j]) for j in lower_hull(c[idx], d[idx])])
    choice = [h[0] for h in hulls]
    spent = float(sum(costs[i, c] for i, c in enumerate(choice)))
    segments = [
        (-(dists[i, a] - dists[i, b]) / (costs[i, b] - costs[i, a]), i, a, b, costs[i, b] - costs[i, a])
        for i, h in enumerate(hulls) for a, b in zip(h, h[1:])
    ]
    segments.sort(key=lambda s: (s[0], s[1]))
    totals = [spent]
    for _, i, a, b, dc in segments:
        if choice[i] == a:
            choice[i] = b
            spent += dc
            totals.append(spent)
    return totals


def _random_instance(rng, n, k):
    """Costs/distortions that stress the exactness: ties (integer grids), awkward float sums (0.1 steps, large
    offsets), unavailable options; every row keeps at least one finite cost unless ``n`` asks for a bad row."""
    kind = rng.integers(4)
    if kind == 0:  # integer grid: equal costs, equal distortions, equal efficiencies across items
        costs, dists = rng.integers(0, 5, (n, k)).astype(float), rng.integers(0, 5, (n, k)).astype(float)
    elif kind == 1:  # 0.1 steps: sums that depend on their order
        costs, dists = rng.integers(0, 30, (n, k)) * 0.1, rng.integers(0, 30, (n, k)) * 0.3
    elif kind == 2:  # a large common offset: each addition rounds
        costs = 1e15 + rng.integers(0, 9, (n, k)) * rng.choice([0.5, 1.0, 3.0])
        dists = rng.uniform(0, 1, (n, k))
    else:  # lowra-like channels: widths 0..4 of length 16/48 with Gaussian-ish distortions
        widths = np.sort(rng.integers(0, 5, (n, k)), 1)
        lengths = rng.choice([16.0, 48.0], n)[:, None]
        costs = widths * lengths + 16 * 2.0**widths
        dists = rng.lognormal(0, 1, (n, 1)) * lengths * np.array([1, 0.3634, 0.1175, 0.04, 0.0095])[widths]
    costs[rng.random((n, k)) < 0.15] = np.inf
    costs[:, 0] = np.where(np.isfinite(costs).any(1), costs[:, 0], 1.0)
    return costs, dists


def _same(costs, dists, budget):
    def run(fn):
        try:
            return fn(costs, dists, budget)
        except (ValueError, BudgetError) as error:
            return f"{type(error).__name__}: {error}"

    want, got = run(_assign_precision_reference), run(assign_precision)
    if isinstance(want, str) or isinstance(got, str):
        assert got == want, budget
    else:
        assert got.dtype == want.dtype and got.tolist() == want.tolist(), budget


# 1: windows of one segment (vector passes only); 7: windows and the plain loop mixed; 10**9: the loop only
@pytest.mark.parametrize("min_window", [1, 7, 10**9])
def test_matches_reference_on_random_instances(monkeypatch, min_window):
    monkeypatch.setattr(allocation, "_MIN_WINDOW", min_window)
    rng = np.random.default_rng(min_window)
    for _ in range(60):
        n, k = int(rng.integers(1, 40)), int(rng.integers(2, 6))
        costs, dists = _random_instance(rng, n, k)
        finite = np.isfinite(costs)
        lowest, highest = np.where(finite, costs, np.inf).min(1).sum(), np.where(finite, costs, -np.inf).max(1).sum()
        totals = _running_totals(costs, dists)
        budgets = [lowest, highest, np.nextafter(lowest, -np.inf), lowest - 1, np.inf, np.nan]
        budgets += list(rng.uniform(lowest, highest, 2))
        for total in rng.choice(totals, min(3, len(totals)), replace=False):
            budgets += [total, np.nextafter(total, -np.inf), np.nextafter(total, np.inf)]
        for budget in budgets:
            _same(costs, dists, budget)


def test_matches_reference_on_lowra_sized_rows():
    """5,000 rows of 3 options like a model's (1/2/4 bits of 4096- or 11008-wide rows), several budgets."""
    rng = np.random.default_rng(0)
    lengths = rng.choice([4096.0, 11008.0], 5_000)[:, None]
    widths = np.array([1.0, 2.0, 4.0])
    costs = widths * lengths + 16 * 2**widths
    dists = rng.lognormal(0, 1, (5_000, 1)) * lengths * np.array([0.36, 0.12, 0.01])
    for bits in (1.0, 1.5, 2.0, 4.1):
        _same(costs, dists, bits * lengths.sum())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference's own overflow on the 1e308 case
def test_matches_reference_on_degenerate_inputs():
    inf, nan = np.inf, np.nan
    cases = [
        (np.zeros((0, 3)), np.zeros((0, 3)), 0.0),  # no items
        (np.zeros((0, 0)), np.zeros((0, 0)), -1.0),  # no items, budget below zero
        (np.array([[3.0]]), np.array([[1.0]]), 5.0),  # one option
        (np.array([[1.0, inf], [inf, inf]]), np.ones((2, 2)), 5.0),  # an item with nothing storable
        (np.ones((2, 3)), np.ones((3, 2)), 5.0),  # shapes differ
        (np.array([[0.0, 1.0, 2.0]]), np.array([[1.0, nan, 0.0]]), 1.5),  # NaN distortion: the reference decides
        (np.array([[0.0, 1.0, 2.0]]), np.array([[inf, 1.0, 0.0]]), 1.5),  # inf distortion
        (np.array([[-1e308, 1e308]]), np.array([[1e308, -1e308]]), inf),  # efficiency overflows to NaN
        (np.array([[0.0, 1.0, 1.0, 2.0]]), np.array([[3.0, 1.0, 1.0, 1.0]]), 10.0),  # duplicate options
    ]
    for costs, dists, budget in cases:
        _same(costs, dists, budget)


def test_rounding_that_reverses_an_items_segments():
    """Collinear to a few ulps: the hull keeps the middle option, yet the rounded efficiency of its second
    segment sorts before its first; the reference then finds the item not at that segment's start and never
    takes it, whatever the budget. Here with other items around it."""
    costs = np.array([[60.0, 120.0, 205.0], [0.0, 50.0, 100.0], [0.0, 70.0, 140.0]])
    dists = np.array([[1.5, 1.062214930426496, 0.44201941519736543], [1.0, 0.7, 0.5], [2.0, 1.4, 1.0]])
    hull_effs = -np.diff(dists[0]) / np.diff(costs[0])
    assert lower_hull(costs[0], dists[0]) == [0, 1, 2] and -hull_effs[1] < -hull_effs[0]
    assert assign_precision(costs[:1], dists[:1], 1e6).tolist() == [1]
    for budget in _running_totals(costs, dists) + [0.0, 120.0, 205.0, 250.0, 300.0, 365.0, 1e6]:
        _same(costs, dists, budget)
