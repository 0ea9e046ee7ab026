"""Reference quantizers and bounds the LowRA base is measured against: NF levels, one container, exact MILP."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowra.sdk.errors import BudgetError, ConfigError
from lowra.sdk.quant.allocation import assign_precision
from lowra.sdk.quant.baselines import (
    milp_assign,
    nf_quantize,
    normal_float_levels,
    uniform_quantize,
    water_filling_bound,
)

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), QLoRA appendix E.
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_normal_float_levels_are_qlora_nf4():
    np.testing.assert_allclose(normal_float_levels(4), NF4, atol=2e-7)
    nf2 = normal_float_levels(2)
    assert nf2[0] == -1 and nf2[1] == 0 and nf2[3] == 1 and nf2[2] == pytest.approx(0.43582, abs=1e-5)
    with pytest.raises(ConfigError, match="2 and 4 bits"):
        normal_float_levels(1)


def test_baselines_decode_through_the_same_container():
    torch.manual_seed(3)
    W = torch.randn(5, 70)
    for fn, bits, levels in ((nf_quantize, 4, np.array(NF4)), (uniform_quantize, 2, np.linspace(-1, 1, 4))):
        qw = fn(W, bits, group_size=32)
        qw.validate()
        lv = levels.astype(np.float16).astype(np.float64)
        np.testing.assert_array_equal(qw.codebooks.reshape(5, -1), np.tile(lv.astype(np.float16), (5, 1)))
        s = np.repeat(qw.scales.astype(np.float64), 32, axis=1)[:, :70]
        x = W.double().numpy() / s
        nearest = lv[np.abs(x[..., None] - lv).argmin(-1)]
        np.testing.assert_allclose(qw.dequantize(), nearest * s, rtol=0, atol=1e-6)


def test_water_filling_bound():
    # One Gaussian source: D(R) = var * 2^(-2R).
    assert water_filling_bound(np.array([4.0]), np.array([100]), 200) == pytest.approx(4 * 100 * 2.0**-4, rel=1e-6)
    # Two rows, 1 bit/element in total: all bits go to the big row until theta reaches the small one.
    d = water_filling_bound(np.array([16.0, 0.01]), np.array([10, 10]), 10)
    assert d == pytest.approx(10 * 16 * 2.0**-2 + 10 * 0.01, rel=1e-6)


def test_assign_precision_within_a_tenth_of_a_percent_of_milp():
    rng = np.random.default_rng(0)
    n = 400
    lengths = rng.choice([576, 1536], n)
    costs = np.stack([8 * ((lengths * w + 7) // 8) + 16 * 2**w for w in (1, 2, 4)], 1).astype(float)
    mse = np.array([0.3634, 0.1175, 0.0095]) * rng.uniform(0.9, 1.1, (n, 3))
    dists = rng.lognormal(0, 1, n)[:, None] * lengths[:, None] * mse
    for frac in (0.1, 0.4, 0.8):
        budget = costs[:, 0].sum() + frac * (costs[:, 2].sum() - costs[:, 0].sum())
        greedy, exact = assign_precision(costs, dists, budget), milp_assign(costs, dists, budget)
        assert costs[np.arange(n), greedy].sum() <= budget and costs[np.arange(n), exact].sum() <= budget
        got, best = dists[np.arange(n), greedy].sum(), dists[np.arange(n), exact].sum()
        assert best <= got <= best * 1.001
    with pytest.raises(BudgetError, match="below the cheapest"):
        milp_assign(costs, dists, costs[:, 0].sum() - 1)
