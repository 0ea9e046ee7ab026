"""Reference quantizers the LowRA base is measured against (bench/ and tests only; the product never uses them).

QLoRA's NormalFloat and symmetric round-to-nearest, stored in the same container as the LowRA base (one decode
path), the water-filling bound on what any code could reach, and the exact MILP optimum of the precision
assignment that :func:`lowra.sdk.quant.allocation.assign_precision` approximates.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import torch

from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.errors import BudgetError, ConfigError
from lowra.sdk.quant.allocation import option_tables
from lowra.sdk.quant.base.fit import assemble, check_widths, prepare_layer

__all__ = ["milp_assign", "nf_quantize", "normal_float_levels", "uniform_quantize", "water_filling_bound"]


def normal_float_levels(bits: int) -> np.ndarray:
    """QLoRA's NormalFloat levels for ``bits`` in {2, 4}: asymmetric, with an exact zero, scaled to [-1, 1].

    QLoRA (Dettmers et al. 2023, bitsandbytes ``create_normal_map``): ``2**(b-1)`` positive levels at normal
    quantiles ``linspace(offset, 0.5, 2**(b-1) + 1)[:-1]``, ``2**(b-1) - 1`` negative ones at
    ``linspace(offset, 0.5, 2**(b-1))[:-1]``, plus 0, all divided by the largest. ``offset`` is the mean of
    ``1 - 1/(2(n-1))`` and ``1 - 1/(2n)`` for ``n = 2**b`` levels (0.9677 at 4 bits, QLoRA's value). 1 bit has no
    NormalFloat (one sign would get no level at all).
    """
    if bits not in (2, 4):
        raise ConfigError(f"NormalFloat is defined here for 2 and 4 bits, got {bits}; use uniform_quantize at 1 bit")
    n = 1 << bits
    offset = 1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n))
    dist = NormalDist()
    positive = [dist.inv_cdf(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    negative = [-dist.inv_cdf(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    levels = np.array(sorted(positive + [0.0] + negative), dtype=np.float64)
    return levels / levels.max()


def _fixed_levels(W: torch.Tensor, bits: int, group_size: int, unit_levels: np.ndarray, name: str) -> QuantizedWeight:
    prep = prepare_layer(name, W, group_size, None)
    out = prep.shape[0]
    lv = torch.from_numpy(unit_levels).to(torch.float64)[None, :].expand(out, -1)
    if not group_size:  # no scales: the row's absmax goes into its codebook
        lv = lv * prep.values.abs().amax(1, keepdim=True)
    lv = lv.to(torch.float16).to(torch.float64)
    return assemble(prep, check_widths(bits, out), {bits: lv})


def nf_quantize(W: torch.Tensor, bits: int, group_size: int = 64, name: str = "weight") -> QuantizedWeight:
    """QLoRA NormalFloat (NF2/NF4) with absmax groups, stored in the same container (one decode path).

    In QLoRA's own format the levels are global; here each row carries a copy (16 * 2**b bits per row), so
    compare NF at its native bits ``b + 16 / group_size`` (the bench does).
    """
    return _fixed_levels(W, bits, group_size, normal_float_levels(bits), name)


def uniform_quantize(W: torch.Tensor, bits: int, group_size: int = 64, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest on ``2**bits`` evenly spaced levels over ``[-absmax, absmax]`` of each group.

    This is min-max quantization of the *symmetric* range: the container has no per-group zero-point, so an
    asymmetric min-max (min and max per group, b + 32/G bits) cannot be stored; the bench measures that one
    separately in numpy. Native bits ``b + 16 / group_size``.
    """
    if bits not in CODED_WIDTHS:
        raise ConfigError(f"bits must be one of {CODED_WIDTHS}, got {bits}")
    return _fixed_levels(W, bits, group_size, np.linspace(-1.0, 1.0, 1 << bits), name)


def water_filling_bound(row_variances: np.ndarray, row_lengths: np.ndarray, total_bits: float) -> float:
    """Least total squared error any code of ``total_bits`` can reach on independent Gaussian rows.

    Reverse water-filling: a row of variance ``v`` costs ``0.5 * log2(v / theta)`` bits per element (0 when
    ``v <= theta``) and leaves ``min(theta, v)`` error per element; ``theta`` is set so the bits add up.
    """
    var = np.asarray(row_variances, dtype=np.float64)
    length = np.asarray(row_lengths, dtype=np.float64)
    pos = var > 0
    if total_bits <= 0 or not pos.any():
        return float(np.sum(var * length))

    def bits_at(theta: float) -> float:
        return float(np.sum(length[pos] * np.maximum(0.0, 0.5 * np.log2(var[pos] / theta))))

    lo, hi = np.log(var[pos].min()) - 2 * np.log(2) * total_bits / length.sum() - 50, np.log(var[pos].max())
    for _ in range(200):  # bisection on log theta
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if bits_at(float(np.exp(mid))) > total_bits else (lo, mid)
    theta = float(np.exp(hi))
    return float(np.sum(length * np.minimum(theta, var)))


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

    costs, distortions = option_tables(costs, distortions)
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
