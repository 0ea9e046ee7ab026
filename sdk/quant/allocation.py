"""Precision assignment under a bit budget: a multiple-choice knapsack solved on convex hulls.

Every item (a channel, or an adapter component) has a few options, each with a cost in bits and a distortion.
We pick one option per item so that total cost <= budget and total distortion is (near-)minimal. Greedy on
each item's lower convex hull, taking upgrades in order of distortion saved per bit, is the exact Lagrangian
solution at every budget it lands on exactly; the leftover is filled greedily. ``tests`` compare it with a
brute-force optimum on small instances.
"""
from __future__ import annotations

import numpy as np

from lowra.sdk.errors import BudgetError


def option_tables(costs: np.ndarray, distortions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both tables as float64 [items, options] arrays of the same shape (ValueError otherwise)."""
    costs = np.asarray(costs, dtype=np.float64)
    distortions = np.asarray(distortions, dtype=np.float64)
    if costs.shape != distortions.shape or costs.ndim != 2:
        raise ValueError(f"costs {costs.shape} and distortions {distortions.shape} must both be [items, options]")
    return costs, distortions


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

    Vectorized over items (LLaMA-2-7B's 1.36M rows x 3 options in ~1-2 s): the choice is bit for bit that of
    :func:`_assign_precision_reference`, the same greedy spelled out in plain Python (~50 s there). Every float
    that decides something (hull tests, efficiencies, the running total of bits spent) is computed by the same
    operations in the same order, so the two agree on every tie and at every budget boundary.
    """
    costs, distortions = option_tables(costs, distortions)
    items, options = costs.shape
    finite = np.isfinite(costs)
    if not np.isfinite(distortions[finite]).all():
        # inf/NaN distortions make the hull's comparisons NaN-dependent; the reference defines what they do
        return _assign_precision_reference(costs, distortions, budget)
    hull, length, hull_cost, hull_dist = _lower_hulls(costs, distortions, finite)
    if (length == 0).any():
        raise ValueError("every item needs at least one option with finite cost")
    # The reference adds the base costs one by one from the first item; cumsum adds in the same order.
    spent = float(np.cumsum(hull_cost[:, 0])[-1]) if items else 0.0
    if spent > budget:
        raise BudgetError(
            f"the budget of {budget:.0f} bits is below the cheapest storable choice ({spent:.0f} bits); "
            "raise the budget"
        )
    if options < 2:
        return hull[:, 0].copy() if items else np.zeros(0, dtype=np.int64)
    # Segment l of an item goes from hull[l] to hull[l + 1]: [items, options - 1] grids.
    exists = length[:, None] > np.arange(1, options)[None, :]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the reference's floats overflow alike
        dc = hull_cost[:, 1:] - hull_cost[:, :-1]  # > 0 where it exists: costs strictly increase along a hull
        efficiency = -(hull_dist[:, :-1] - hull_dist[:, 1:]) / dc
    if np.isnan(efficiency[exists]).any():
        return _assign_precision_reference(costs, distortions, budget)  # overflowed inf/inf: order undefined
    # The reference sorts its item-major list by (efficiency, item), stably. Rounding can put an item's later
    # segment before its earlier one (in exact arithmetic efficiencies increase along the hull); such a
    # segment, and every later one of its item, finds the item not at its start when its turn comes, whatever
    # the budget. Segment l comes after segment l - 1 iff its efficiency is >= (equal: stable order).
    usable = exists.copy()
    for level in range(1, options - 1):
        usable[:, level] &= usable[:, level - 1] & (efficiency[:, level] >= efficiency[:, level - 1])
    item, level = np.nonzero(usable)  # item-major, along each hull: the reference's list order
    # A stable sort of a subsequence keeps the relative order it has in the stable sort of the whole list. Stable
    # = by (efficiency, position in the list); numpy sorts complex numbers by (real, imag), and sorting values
    # is about twice as fast as a stable argsort. Positions < 2**53 are exact as floats, -0.0 == 0.0 as in
    # the reference, and there is no NaN here.
    key = efficiency[usable] + 1j * np.arange(item.size)
    order = np.sort(key).imag.astype(np.int64)
    at = _take_in_order(item[order], level[order], dc[usable][order], spent, budget, items, options - 1)
    return hull[np.arange(items), at]


def _lower_hulls(
    costs: np.ndarray, distortions: np.ndarray, finite: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`lower_hull` of every row at once.

    Returns the hulls' option indices [items, options] (valid up to ``length`` [items]), and their costs and
    distortions. A monotone chain over the options sorted per row, one step per option for all rows together,
    with the same comparisons as :func:`lower_hull`, so the hulls are identical, degenerate cases included.
    """
    items, options = costs.shape
    cost = np.where(finite, costs, np.inf)
    dist = np.where(finite, distortions, 0.0)
    # lexsort is stable: equal (cost, distortion) keep option order, as sorted() over range(options) does.
    # Flat gathers: take_along_axis builds broadcast index grids, several times slower at a million rows.
    row = np.arange(items) * options
    order = np.lexsort((dist, cost), axis=-1).ravel()
    gather = (order.reshape(items, options) + row[:, None]).ravel()
    flat_cost, flat_dist = cost.ravel()[gather], dist.ravel()[gather]
    cost, dist = flat_cost.reshape(items, options), flat_dist.reshape(items, options)
    valid = finite.ravel()[gather].reshape(items, options)
    hull = np.zeros(items * options, dtype=np.int64)  # positions in the sorted order, flat [items, options]
    length = np.zeros(items, dtype=np.int64)
    top_cost, top_dist = np.zeros(items), np.zeros(items)  # the stack's top, where length > 0
    for j in range(options):
        cj, dj = cost[:, j], dist[:, j]
        push = valid[:, j] & ~((length > 0) & ((cj == top_cost) | (dj >= top_dist)))
        popping = np.flatnonzero(push & (length >= 2))
        while popping.size:
            n, start = length[popping], popping * options
            a, b = start + hull[start + n - 2], start + hull[start + n - 1]
            ca, da, cb, db = flat_cost[a], flat_dist[a], flat_cost[b], flat_dist[b]
            with np.errstate(over="ignore", invalid="ignore"):
                on_or_above = (db - da) * (cj[popping] - ca) >= (dj[popping] - da) * (cb - ca)
            popping = popping[on_or_above]
            length[popping] -= 1
            popping = popping[length[popping] >= 2]
        pushed = np.flatnonzero(push)
        hull[pushed * options + length[pushed]] = j
        length[pushed] += 1
        top_cost = np.where(push, cj, top_cost)  # j is the new top: no need to track the pops
        top_dist = np.where(push, dj, top_dist)
    at = (hull.reshape(items, options) + row[:, None]).ravel()
    shape = (items, options)
    return order[at].reshape(shape), length, flat_cost[at].reshape(shape), flat_dist[at].reshape(shape)


_MIN_WINDOW = 4096


def _largest_fitting(spent: float, budget: np.float64) -> float:
    """The largest ``dc >= 0`` with ``spent + dc <= budget`` in float64 (``inf`` if any, NaN if none).

    Rounded addition is monotone in ``dc``, so a segment fits iff its ``dc`` is at most this; a binary search over
    the bit patterns of non-negative doubles (ordered like their values) finds it in at most 63 steps.
    """
    spent = np.float64(spent)
    if not spent <= budget:
        return np.nan
    if spent + np.inf <= budget:
        return np.inf
    lo, hi = 0, int(np.array(np.inf).view(np.int64))  # bit patterns: 0.0 fits, inf does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if spent + np.array(mid, dtype=np.int64).view(np.float64) <= budget:
            lo = mid
        else:
            hi = mid
    return float(np.array(lo, dtype=np.int64).view(np.float64))


def _take_in_order(
    item: np.ndarray, level: np.ndarray, dc: np.ndarray, spent: float, budget: float, items: int, levels: int
) -> np.ndarray:
    """Run the greedy over segments in the order given; returns each item's final hull level.

    As in the reference, a segment is taken iff its item is still at the segment's start (its level) and
    ``spent + dc <= budget``, ``spent`` summed one take at a time in float64; an item's segments come in level
    order. A window of the sequence is resolved at once as if every segment with ``dc <= limit`` (the largest
    that fits now) fitted; the running total (a cumsum: the reference's very sums) finds the first that does not,
    and the next window starts after it with a lower limit. Segments above the limit never fit again (``spent``
    only grows), so the windows skip them in bulk. Where failures come thick, a plain loop takes over for a while.
    """
    budget = np.float64(budget)  # what the reference's np.float64 <= budget comparisons convert it to
    count = dc.size
    state = np.zeros(items, dtype=np.int64)  # hull level each item is at
    if not count:
        return state
    smallest_left = np.minimum.accumulate(dc[::-1])[::-1]
    pos, window = 0, count
    while pos < count:
        limit = _largest_fitting(spent, budget)
        if not limit >= smallest_left[pos]:
            break  # nothing left fits, now or later
        end = min(count, pos + window)
        if window < _MIN_WINDOW:  # failures are dense here: one step per segment beats vector passes
            end = min(count, pos + _MIN_WINDOW)
            spent = np.float64(spent)
            for i, lv, d in zip(item[pos:end].tolist(), level[pos:end].tolist(), dc[pos:end].tolist()):
                if state[i] == lv and spent + d <= budget:
                    state[i] = lv + 1
                    spent = spent + d
            pos, window = end, _MIN_WINDOW
            continue
        w_item, w_level, w_dc = item[pos:end], level[pos:end], dc[pos:end]
        ok = w_dc <= limit
        for lv in range(levels):  # level by level, so an item's chain within the window resolves in order
            sel = np.flatnonzero(w_level == lv) if levels > 1 else np.arange(w_dc.size)
            it = w_item[sel]
            ok[sel] &= state[it] == lv
            state[it[ok[sel]]] = lv + 1  # tentatively taken
        idx = np.flatnonzero(ok)
        running = np.cumsum(np.concatenate(([spent], w_dc[idx])))[1:]
        fits = running <= budget
        if fits.all():
            if idx.size:
                spent = running[-1]
            pos, window = end, 2 * window
            continue
        first = int(np.argmin(fits))  # in fact >= 1: the first candidate is <= limit, so it fits
        if first:
            spent = running[first - 1]
        # Undo the tentative takes from the failed one on; an item's lowest undone level is where it stays.
        undo = idx[first:]
        for lv in range(levels - 1, -1, -1):
            state[w_item[undo[w_level[undo] == lv]]] = lv
        advance = int(idx[first]) + 1
        pos, window = pos + advance, 2 * advance
    return state


def _assign_precision_reference(costs: np.ndarray, distortions: np.ndarray, budget: float) -> np.ndarray:
    """The plain-Python form of :func:`assign_precision`: its specification, and its fallback for inputs the
    vectorized form cannot reproduce bit for bit (non-finite distortions, NaN efficiencies). About 40 us per item."""
    costs, distortions = option_tables(costs, distortions)
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
