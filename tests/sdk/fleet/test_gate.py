"""The eval gate: an adapter ships only if it beats the base by the margin and keeps the share of the fp gain."""
from __future__ import annotations

import math

import pytest

from lowra.sdk.errors import ConfigError
from lowra.sdk.fleet.gate import DEFAULT_MIN_GAIN_KEPT, DEFAULT_MIN_GAIN_OVER_BASE, GateConfig, gate_adapter


def test_defaults_are_the_documented_ones() -> None:
    assert GateConfig() == GateConfig(min_gain_over_base=0.05, min_gain_kept=0.90)
    assert (DEFAULT_MIN_GAIN_OVER_BASE, DEFAULT_MIN_GAIN_KEPT) == (0.05, 0.90)


@pytest.mark.parametrize("base,fp,compressed", [
    (4.278, 0.231, 0.255),  # docs/RESULTS.md, terse_notes
    (3.654, 2.249, 2.215),  # python_help: the compressed adapter beats the fp one (>100% kept)
    (2.912, 0.050, 0.062),  # json_reply
])
def test_the_measured_sample_users_ship(base: float, fp: float, compressed: float) -> None:
    decision = gate_adapter(base, fp, compressed)
    assert decision.ships, decision.reason
    assert decision.reason.startswith("ships:")
    assert decision.gain_over_base == pytest.approx((base - compressed) / base)
    assert decision.gain_kept == pytest.approx((base - compressed) / (base - fp))


def test_too_small_a_gain_over_the_base_is_gated_out() -> None:
    # 4% below the base; the fp adapter was no better, so all of its gain is kept: only the margin fails.
    decision = gate_adapter(1.0, 0.96, 0.96)
    assert not decision.ships
    assert "4.0% below the base, needs >= 5.0%" in decision.reason
    assert "gain, needs" not in decision.reason
    assert gate_adapter(1.0, 0.96, 0.96, GateConfig(min_gain_over_base=0.03)).ships


def test_losing_the_fp_gain_in_compression_is_gated_out() -> None:
    decision = gate_adapter(4.0, 1.0, 1.5)  # 62.5% below the base, but keeps 83.3% of the fp gain
    assert not decision.ships
    assert "keeps 83.3% of the fp adapter's gain, needs >= 90.0%" in decision.reason
    assert "below the base, needs" not in decision.reason
    assert gate_adapter(4.0, 1.0, 1.5, GateConfig(min_gain_kept=0.8)).ships


def test_both_failures_are_named() -> None:
    decision = gate_adapter(1.0, 0.5, 0.99)
    assert not decision.ships
    assert "below the base, needs" in decision.reason and "gain, needs" in decision.reason


def test_an_fp_adapter_without_gain_is_gated_out() -> None:
    decision = gate_adapter(2.0, 2.1, 1.5)
    assert not decision.ships
    assert "fp adapter does not improve on the base" in decision.reason
    assert math.isnan(decision.gain_kept)


@pytest.mark.parametrize("losses", [(math.nan, 1.0, 1.0), (2.0, math.inf, 1.0), (2.0, 1.0, math.nan)])
def test_diverged_losses_are_gated_out(losses: tuple[float, float, float]) -> None:
    decision = gate_adapter(*losses)
    assert not decision.ships
    assert "not finite" in decision.reason
    assert decision.as_card() == {"ships": False, "reason": decision.reason, "gain_over_base": None,
                                  "gain_kept": None}


def test_a_zero_base_loss_leaves_nothing_to_gain() -> None:
    decision = gate_adapter(0.0, 0.0, 0.0)
    assert not decision.ships and "zero held-out loss" in decision.reason


def test_negative_losses_are_a_callers_bug() -> None:
    with pytest.raises(ConfigError, match="never negative"):
        gate_adapter(1.0, -0.1, 0.5)


@pytest.mark.parametrize("kwargs", [{"min_gain_over_base": -0.1}, {"min_gain_kept": 1.5},
                                    {"min_gain_kept": True}, {"min_gain_over_base": "0.1"},
                                    {"min_gain_kept": math.nan}])
def test_config_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="must be a share in"):
        GateConfig(**kwargs)  # type: ignore[arg-type]


def test_decision_card_is_json_ready() -> None:
    card = gate_adapter(4.0, 1.0, 1.1).as_card()
    assert card["ships"] is True
    assert card["gain_kept"] == pytest.approx(2.9 / 3.0)
