"""The eval gate: whether a user's compressed adapter ships (becomes ``active``) or is ``gated_out``, and why.

Both conditions are on the user's held-out loss (mean NLL per answer token, :mod:`lowra.sdk.training.eval`), measured
for the base, the fp adapter and the compressed adapter on the same tokens:

1. **The compressed adapter beats the base** by at least ``min_gain_over_base``, relative to the base:
   ``(base - compressed) / base``. Relative, because base losses differ several-fold between tasks (2.9 to 8.9 nats
   on the sample users, docs/RESULTS.md), so no absolute margin in nats means the same for every user.
2. **It keeps at least ``min_gain_kept`` of the fp adapter's gain**: ``(base - compressed) / (base - fp)``, the
   "gain kept" column of docs/RESULTS.md. Compression that loses the gain is a broken blob, not a weaker adapter.

Defaults, and why:

- ``min_gain_over_base = 0.05``: an adapter must lower the held-out loss by 5% (perplexity x0.95) to be worth a
  download and a merge on the device. Every sample user clears it by far (gains of 39% to 98% over the base at
  1 bit, docs/RESULTS.md), so the default rejects adapters that learned nothing, not healthy ones.
- ``min_gain_kept = 0.90``: lowra's 1-bit blobs keep 98.5% to 102.4% of the fp gain on every measured user and
  >= 96.7% even at 0.25 bit (docs/RESULTS.md, "Adapter compression, scheme by scheme"), while a broken compression
  (uniform 1-bit levels) keeps -245% to 4% and the weakest working baseline 90.6%. Below 90% the compressed blob is
  not the adapter that was evaluated; 90% leaves room for evaluation noise on small held-out sets.

A loss that is not finite (a diverged training or compression) gates the user out with that reason; a negative loss
is a caller's bug (NLL is never negative) and raises :class:`~lowra.sdk.errors.ConfigError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lowra.sdk.errors import ConfigError

DEFAULT_MIN_GAIN_OVER_BASE = 0.05
DEFAULT_MIN_GAIN_KEPT = 0.90


@dataclass(frozen=True)
class GateConfig:
    """The two thresholds of the gate (see the module docstring for the defaults' reasons)."""

    min_gain_over_base: float = DEFAULT_MIN_GAIN_OVER_BASE
    min_gain_kept: float = DEFAULT_MIN_GAIN_KEPT

    def __post_init__(self) -> None:
        for name in ("min_gain_over_base", "min_gain_kept"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"GateConfig.{name} must be a share in [0, 1], got {value!r}")


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided for one adapter, with the numbers it decided on (nan where undefined)."""

    ships: bool
    reason: str
    gain_over_base: float
    gain_kept: float

    def as_card(self) -> dict[str, Any]:
        """The decision as the adapter card's ``gate`` entry (JSON has no nan: undefined numbers become null)."""
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731
        return {"ships": self.ships, "reason": self.reason, "gain_over_base": finite(self.gain_over_base),
                "gain_kept": finite(self.gain_kept)}


def gate_adapter(base_loss: float, fp_loss: float, compressed_loss: float,
                 config: GateConfig | None = None) -> GateDecision:
    """Decide whether the compressed adapter ships, from the held-out losses of base, fp adapter and compressed one."""
    config = config or GateConfig()
    losses = {"base": base_loss, "fp adapter": fp_loss, "compressed": compressed_loss}
    shown = ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
    if not all(math.isfinite(value) for value in losses.values()):
        return GateDecision(False, f"held-out loss is not finite ({shown}): training or compression diverged",
                            math.nan, math.nan)
    negative = [name for name, value in losses.items() if value < 0]
    if negative:
        raise ConfigError(f"held-out losses are mean NLLs and never negative; got {shown}")
    if base_loss == 0:
        return GateDecision(False, f"the base already has zero held-out loss ({shown}): nothing to gain",
                            math.nan, math.nan)
    fp_gain = base_loss - fp_loss
    gain_over_base = (base_loss - compressed_loss) / base_loss
    if fp_gain <= 0:
        return GateDecision(False, f"the fp adapter does not improve on the base ({shown}): nothing to ship",
                            gain_over_base, math.nan)
    gain_kept = (base_loss - compressed_loss) / fp_gain
    failures = []
    if gain_over_base < config.min_gain_over_base:
        failures.append(f"compressed loss is {100 * gain_over_base:.1f}% below the base, "
                        f"needs >= {100 * config.min_gain_over_base:.1f}%")
    if gain_kept < config.min_gain_kept:
        failures.append(f"keeps {100 * gain_kept:.1f}% of the fp adapter's gain, "
                        f"needs >= {100 * config.min_gain_kept:.1f}%")
    if failures:
        return GateDecision(False, "; ".join(failures) + f" ({shown})", gain_over_base, gain_kept)
    return GateDecision(True, f"ships: {100 * gain_over_base:.1f}% below the base, keeps {100 * gain_kept:.1f}% "
                              f"of the fp adapter's gain ({shown})", gain_over_base, gain_kept)
