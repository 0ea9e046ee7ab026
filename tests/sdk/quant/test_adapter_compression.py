"""Adapter compression: honest budgets, decode round trips, what weighting buys, and refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowra.device_runtime import formats as fmt
from lowra.sdk.quant.adapter_compression import CARD_RESERVE_BYTES, components, compress_adapter
from lowra.sdk.quant.config import CompressConfig
from lowra.sdk.errors import BudgetError, ConfigError

SHAPES = {f"layers.{i}.{n}": s for i in range(3) for n, s in (("q_proj", (384, 256)), ("down_proj", (256, 640)))}


def make_factors(seed: int = 0, rank: int = 8, decay: float = 2.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA-like factors whose delta has a decaying spectrum, as trained adapters do."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in SHAPES.items():
        a = torch.randn(rank, i, generator=g) * 0.05
        b = torch.randn(o, rank, generator=g) * 0.05 * torch.logspace(0, -decay, rank)[None, :]
        out[name] = (a, b)
    return out


def compress(factors, bits, **kw):
    stats = kw.pop("input_stats", None)
    config = CompressConfig(bits=bits, **kw)
    return compress_adapter(factors, 2.0, config, adapter_id="t", base_fingerprint="sha256:x",
                            lora_meta={"rank": 8}, card={"task": "test"}, input_stats=stats, created="2026-01-01")


def relative_error(factors, blob, stats=None):
    err = energy = 0.0
    for name, (a, b) in factors.items():
        delta = (2.0 * b.double() @ a.double()).numpy()
        up, down = blob.factors(name)
        diff = up.astype(np.float64) @ down.astype(np.float64) - delta
        w = np.ones(delta.shape[1]) if stats is None else stats[name].double().numpy()
        err += float((diff**2 * w).sum())
        energy += float((delta**2 * w).sum())
    return err / energy


def test_activation_aware_svd_is_exact_and_ordered():
    a, b = make_factors()["layers.0.q_proj"]
    ms = torch.rand(a.shape[1], dtype=torch.float64) + 0.1
    c = components(a, b, 2.0, ms)
    np.testing.assert_allclose((c.up @ c.down).numpy(), (2.0 * b.double() @ a.double()).numpy(), atol=1e-10)
    assert torch.all(c.sigma[:-1] >= c.sigma[1:])
    # Components are orthogonal in the input-weighted metric: (down D)(down D)^T is diagonal = sigma.
    white = c.down * ms.sqrt()[None, :]
    np.testing.assert_allclose((white @ white.T).numpy(), torch.diag(c.sigma).numpy(), atol=1e-10)


@pytest.mark.parametrize("bits", [0.75, 1.0, 1.5, 2.0, 3.0])
def test_whole_file_fits_the_budget(bits):
    factors = make_factors()
    c = compress(factors, bits)
    n_params = sum(a.numel() + b.numel() for a, b in factors.values())
    assert c.report["n_params"] == n_params
    assert c.report["effective_bits"] == pytest.approx(8 * len(c.blob_bytes) / n_params)
    assert c.report["effective_bits"] <= bits
    assert c.report["code_bits"] < c.report["effective_bits"]
    # The budget is used, not wasted: within a few channels' worth of bytes of the limit.
    assert c.report["effective_bits"] >= bits - 0.15


def test_error_falls_with_bits_and_prediction_is_honest():
    factors = make_factors()
    errors = []
    for bits in (0.75, 1.0, 1.5, 2.0, 3.0):
        c = compress(factors, bits)
        actual = relative_error(factors, c.blob)
        assert actual == pytest.approx(c.predicted_error, rel=0.25, abs=2e-3)
        errors.append(actual)
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 0.02


def test_weighting_lowers_the_error_that_matters():
    """With uneven input statistics, weighted compression must beat unweighted on the weighted error."""
    factors = make_factors(seed=3)
    g = torch.Generator().manual_seed(1)
    stats = {n: torch.exp(torch.randn(a.shape[1], generator=g) * 3.0) for n, (a, b) in factors.items()}
    weighted = compress(factors, 1.0, input_stats=stats, weighted=True)
    plain = compress(factors, 1.0, input_stats=stats, weighted=False)
    assert relative_error(factors, weighted.blob, stats) < 0.8 * relative_error(factors, plain.blob, stats)


def test_deterministic_bytes():
    factors = make_factors()
    assert compress(factors, 1.0).blob_bytes == compress(factors, 1.0).blob_bytes


def test_blob_round_trips_through_the_device_parser():
    c = compress(make_factors(), 1.0)
    again = fmt.parse_blob(c.blob_bytes)
    for m in c.blob.modules:
        for x, y in zip(again.factors(m.name), c.blob.factors(m.name)):
            np.testing.assert_array_equal(x, y)
    assert again.metadata["card"] == {"task": "test"}
    assert again.metadata["scheme"]["budget_bits"] == 1.0


def test_card_can_be_replaced_within_the_reserve():
    c = compress(make_factors(), 1.0)
    carded = c.with_card({"task": "test", "heldout_loss": {"base": 1.2345678, "compressed": 0.12345678}})
    assert carded.blob.codes.tobytes() == c.blob.codes.tobytes()
    assert carded.report["effective_bits"] <= 1.0
    with pytest.raises(BudgetError, match="card grew"):
        c.with_card({"task": "x" * (CARD_RESERVE_BYTES + 4096)})


def test_budget_below_the_header_is_refused():
    with pytest.raises(BudgetError, match=r"below what any blob needs: \d+ bytes of header"):
        compress(make_factors(), 0.01)


@pytest.mark.parametrize("bits", [0, -1, float("nan"), 17, "1"])
def test_invalid_budget(bits):
    with pytest.raises(BudgetError, match="bits must be a number"):
        CompressConfig(bits=bits)


def test_non_finite_adapter_is_refused():
    factors = make_factors()
    factors["layers.1.q_proj"][1][3, 2] = float("inf")
    with pytest.raises(ConfigError, match=r"layers\.1\.q_proj: lora_B contains NaN or Inf"):
        compress(factors, 1.0)


def test_inconsistent_factor_shapes_are_refused():
    factors = make_factors()
    a, b = factors["layers.0.q_proj"]
    factors["layers.0.q_proj"] = (a, b[:, :4])
    with pytest.raises(ConfigError, match="must be \\[r, in\\] and \\[out, r\\]"):
        compress(factors, 1.0)
