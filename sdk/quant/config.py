"""CompressConfig: the budget of an adapter's compression into a blob (torch-free, for the CLI parser)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from lowra.sdk.errors import BudgetError, ConfigError


@dataclass
class CompressConfig:
    bits: float = 1.0  # effective bits per fp adapter parameter, every stored byte counted
    weighted: bool = True  # use input second moments (activation-aware SVD + weighted Lloyd-Max)
    iters: int = 40  # Lloyd-Max iterations (it stops earlier once converged)

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits) and 0 < self.bits <= 16):
            raise BudgetError(f"bits must be a number in (0, 16] effective bits per parameter, got {self.bits!r}")
        if self.iters < 1:
            raise ConfigError(f"iters must be >= 1, got {self.iters}")
