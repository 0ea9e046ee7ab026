"""QuantizeConfig: the budget and layout of a base model's quantization (torch-free, for the CLI parser)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from lowra.sdk.errors import BudgetError, ConfigError
from lowra.sdk.targets import ALL_LINEAR, check_targets

# Measured on SmolLM2 (bench/bench_base_quantization.py, MSE/var at 1.5 / 2.0 / 2.5 effective bits):
# no groups 0.233 / 0.131 / 0.088; G=256 0.257 / 0.147 / 0.095; G=128 0.273 / 0.157 / 0.098; G=64 0.304 / 0.177 /
# 0.103; G=32 infeasible / 0.232 / 0.125. The per-row codebook already absorbs the row's scale and the float16
# scales cost more bits than the local scale adaptation saves -- even 8-bit double-quantized scales would not
# change the order (bound measured: G=64 0.269 / 0.152 / 0.095). So rows get no groups by default.
DEFAULT_GROUP_SIZE = 0


@dataclass
class QuantizeConfig:
    bits: float = 1.5  # effective bits per quantized parameter, every byte of the file counted (dense data aside)
    group_size: int = DEFAULT_GROUP_SIZE  # inputs per absmax group; 0 = one codebook per row, no scales
    targets: str | list[str] = ALL_LINEAR
    weighted: bool = False  # weight the error by input second moments (needs input_stats)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits)):
            raise BudgetError(f"bits must be a finite number of effective bits per parameter, got {self.bits!r}")
        if not 0 < self.bits <= 32:
            raise BudgetError(f"bits must be in (0, 32] effective bits per parameter, got {self.bits}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(
                f"group_size must be an integer >= 0 (inputs per absmax group, 0 = no groups), got {self.group_size!r}"
            )
        self.targets = check_targets(self.targets, "QuantizeConfig.targets")
