"""Precision assignment under a bit budget: a multiple-choice knapsack solved on convex hulls.

Every item (a channel, or an adapter component) has a few options, each with a cost in bits and a distortion.
We pick one option per item so that total cost <= budget and total distortion is (near-)minimal. Greedy on
each item's lower convex hull, taking upgrades in order of distortion saved per bit, is the exact Lagrangian
solution at every budget it lands on exactly; the leftover is filled greedily. ``tests`` compare it with a
brute-force optimum on small instances.
"""
from __future__ import annotations

import numpy as np

from .errors import BudgetError


def lower_hull(costs: np.ndarray, distortions: np.ndarray) -> list[int]:
    """Indices of the options on the lower convex hull of (cost, distortion), by increasing cost."""
    order = sorted(range(len(costs)), key=lambda j: (costs[j], distortions[j]))
    hull: list[int] = []
    for j in order:
        if hull and costs[j] == costs[hull[-1]]:
            continue  # same cost, higher (or equal) distortion: dominated
        if hull and distortions[j] >= distortions[hull[-1]]:
            continue  # costs more, saves nothing
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> j: it is never the best choice for any price per bit
            if (distortions[b] - distortions[a]) * (costs[j] - costs[a]) >= (distortions[j] - distortions[a]) * (
                costs[b] - costs[a]
            ):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def assign_precision(costs: np.ndarray, distortions: np.ndarray, budget: float) -> np.ndarray:
    """Choose one option per row of ``costs``/``distortions`` [items, options] within ``budget`` total cost.

    Infeasible options can be marked with ``cost = inf``. Returns the chosen option index per item.
    """
    costs = np.asarray(costs, dtype=np.float64)
    distortions = np.asarray(distortions, dtype=np.float64)
    if costs.shape != distortions.shape or costs.ndim != 2:
        raise ValueError(f"costs {costs.shape} and distortions {distortions.shape} must both be [items, options]")
    hulls = [lower_hull(c[np.isfinite(c)], d[np.isfinite(c)]) for c, d in zip(costs, distortions)]
    finite_idx = [np.nonzero(np.isfinite(c))[0] for c in costs]
    hulls = [[int(fi[j]) for j in h] for h, fi in zip(hulls, finite_idx)]
    if any(not h for h in hulls):
        raise ValueError("every item needs at least one option with finite cost")
    choice = np.array([h[0] for h in hulls], dtype=np.int64)
    spent = float(sum(costs[i, c] for i, c in enumerate(choice)))
    if spent > budget:
        raise BudgetError(
            f"the budget of {budget:.0f} bits is below the cheapest storable choice ({spent:.0f} bits); "
            "raise the budget"
        )
    # Upgrades along each hull, globally by efficiency. Within an item efficiencies decrease (convexity), so
    # taking segments in global order always takes an item's segments in their own order.
    segments = []
    for i, h in enumerate(hulls):
        for a, b in zip(h, h[1:]):
            dc = costs[i, b] - costs[i, a]
            dd = distortions[i, a] - distortions[i, b]
            segments.append((-dd / dc, i, a, b, dc))
    segments.sort(key=lambda s: (s[0], s[1]))
    for _, i, a, b, dc in segments:
        if choice[i] == a and spent + dc <= budget:
            choice[i] = b
            spent += dc
    return choice


def milp_assign(
    costs: np.ndarray,
    distortions: np.ndarray,
    budget: float,
    time_limit: float | None = None,
    rel_gap: float = 1e-7,
) -> np.ndarray:
    """The exact optimum of the same problem as :func:`assign_precision`, by mixed-integer programming (HiGHS).

    One binary per (item, option), one "pick exactly one" row per item and the budget row. Meant for checking
    :func:`assign_precision` on small instances (thousands of items solve in seconds; the paper's ILP over a 7B
    model's channels took 319 s, which is why it clustered them). ``cost = inf`` marks an option unavailable.
    ``rel_gap`` is the solver's proven optimality gap (HiGHS defaults to 1e-4, about the size of the greedy's own
    gap, so we ask for less).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, vstack

    costs = np.asarray(costs, dtype=np.float64)
    distortions = np.asarray(distortions, dtype=np.float64)
    if costs.shape != distortions.shape or costs.ndim != 2:
        raise ValueError(f"costs {costs.shape} and distortions {distortions.shape} must both be [items, options]")
    items, options = costs.shape
    finite = np.isfinite(costs)
    c_cost = np.where(finite, costs, 0.0).ravel()
    c_dist = np.where(finite, distortions, 0.0).ravel()
    cheapest = np.where(finite, costs, np.inf).min(1).sum()
    if not np.isfinite(cheapest):
        raise ValueError("every item needs at least one option with finite cost")
    if cheapest > budget:
        raise BudgetError(
            f"the budget of {budget:.0f} bits is below the cheapest storable choice ({cheapest:.0f} bits); raise the budget"
        )
    rows = np.repeat(np.arange(items), options)
    one_each = coo_matrix((np.ones(items * options), (rows, np.arange(items * options))), shape=(items, items * options))
    a = vstack([one_each, coo_matrix(c_cost[None, :])]).tocsr()
    constraints = LinearConstraint(a, np.r_[np.ones(items), -np.inf], np.r_[np.ones(items), budget])
    options_dict: dict[str, float] = {"mip_rel_gap": rel_gap}
    if time_limit:
        options_dict["time_limit"] = time_limit
    result = milp(
        c_dist, constraints=constraints, integrality=np.ones(items * options),
        bounds=Bounds(0, finite.ravel().astype(np.float64)), options=options_dict,
    )
    if result.x is None:
        raise RuntimeError(f"the MILP solver found no solution: {result.message}")
    return np.argmax(result.x.reshape(items, options), axis=1)
