"""QuantizeConfig: the budget and layout of a base model's quantization (torch-free, for the CLI parser)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lowra.device_runtime.formats.constants import CODEBOOK_FORMATS
from lowra.sdk.errors import BudgetError, ConfigError
from lowra.sdk.targets import ALL_LINEAR, check_targets

# Measured on SmolLM2 (bench/bench_base_quantization.py, MSE/var at 1.5 / 2.0 / 2.5 effective bits):
# no groups 0.233 / 0.131 / 0.088; G=256 0.257 / 0.147 / 0.095; G=128 0.273 / 0.157 / 0.098; G=64 0.304 / 0.177 /
# 0.103; G=32 infeasible / 0.232 / 0.125. The per-row codebook already absorbs the row's scale and the float16
# scales cost more bits than the local scale adaptation saves -- even 8-bit double-quantized scales would not
# change the order (bound measured: G=64 0.269 / 0.152 / 0.095). So rows get no groups by default.
DEFAULT_GROUP_SIZE = 0
# The calibration text (see lowra.sdk.training.calibration): the sample users' train sets + CPython's pydoc topics.
DEFAULT_CALIBRATION = "default"
# How much a row's expected output error costs in the knapsack, per layer (see lowra.sdk.quant.base.sensitivity):
#   "none"   1 for every layer: rows compete by expected output error sum_j E[x_j^2] (W - Q(W))_rj^2 alone
#   "fisher" times the layer's empirical Fisher: the mean squared gradient of the calibration loss w.r.t. the
#            layer's outputs, so an error counts by how much the model's loss feels it
SENSITIVITIES = ("none", "fisher")
DEFAULT_SENSITIVITY = "fisher"
# GPTQ-style error-feedback rounding against the calibration inputs' Hessian (see lowra.sdk.quant.base.gptq).
# Measured on SmolLM2 (bench/bench_base_nll.py, held-out NLL per answer token, fp32 3.513), without -> with:
# 4.0 bits 3.629 -> 3.496, 3.0 bits 4.702 -> 3.781, 2.0 bits 9.023 -> 5.906; same widths and codebooks, same layout.
DEFAULT_ERROR_FEEDBACK = True
# How the file stores each row's levels (CODEBOOK_FORMATS): "int", integers times a power of two per row, 6 bits a
# level in 1- and 2-bit rows and 8 in 4-bit rows (base format version 4: a 2-bit row's codebook in 32 bits instead of
# 64), or "float16" (version 1, readable by lowra releases before version 4). Codebooks are fitted on the integer
# grid, so the bits saved buy wider rows. Measured on SmolLM2 (bench/bench_codebook_storage.py, weight MSE, MSE/var
# at 1.5 / 2.0 / 3.0 / 4.0 effective bits): float16 0.2328 / 0.1310 / 0.0603 / 0.0177, int 0.2261 / 0.1249 / 0.0557
# / 0.0128; held-out NLL of the default (calibrated, error-fed) base: docs/RESULTS.md.
DEFAULT_CODEBOOK_FORMAT = "int"


@dataclass
class QuantizeConfig:
    bits: float = 1.5  # effective bits per quantized parameter, every byte of the file counted (dense data aside)
    group_size: int = DEFAULT_GROUP_SIZE  # inputs per absmax group; 0 = one codebook per row, no scales
    targets: str | list[str] = ALL_LINEAR
    # Calibration text: "default", a folder of .txt/.jsonl files, or None for none (codebooks and widths then
    # minimize the weight error alone). Calibrated, codebooks are weighted by each input's E[x^2] and rows compete
    # in the knapsack by their expected output error times the layer's ``sensitivity``.
    calibration: str | os.PathLike[str] | None = DEFAULT_CALIBRATION
    sensitivity: str = DEFAULT_SENSITIVITY  # see SENSITIVITIES; used only when calibrated
    # Round each layer's columns in order, feeding every column's rounding error forward to the columns not yet
    # rounded through the calibration inputs' Hessian E[x x^T] (GPTQ); used only when calibrated.
    error_feedback: bool = DEFAULT_ERROR_FEEDBACK
    codebook_format: str = DEFAULT_CODEBOOK_FORMAT  # "int" (format version 4) or "float16" (version 1)

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
        if isinstance(self.calibration, os.PathLike):
            self.calibration = os.fspath(self.calibration)
        if self.calibration is not None and (not isinstance(self.calibration, str) or not self.calibration):
            raise ConfigError(
                f"calibration must be {DEFAULT_CALIBRATION!r}, a folder of .txt/.jsonl files or None (uncalibrated), "
                f"got {self.calibration!r}"
            )
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity must be one of {SENSITIVITIES}, got {self.sensitivity!r}")
        if self.codebook_format not in CODEBOOK_FORMATS:
            raise ConfigError(f"codebook_format must be one of {CODEBOOK_FORMATS}, got {self.codebook_format!r}")
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(f"error_feedback must be True or False, got {self.error_feedback!r}")

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def feeds_back(self) -> bool:
        """Whether rounding uses error feedback: it needs the calibration inputs' Hessian."""
        return self.calibrated and self.error_feedback


@dataclass(frozen=True)
class RecoveryConfig:
    """How the recovery adapter is trained. The defaults are the one setting measured so far (SmolLM2-135M at 2.0
    bits, docs/RESULTS.md), not a tuned optimum."""

    rank: int = 16
    alpha: float = 32.0
    steps: int = 200
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    batch_size: int = 8
    length: int = 128
    sequences: int = 512
    temperature: float = 1.0
    seed: int = 0
    source: str = DEFAULT_CALIBRATION
    # Store the adapter compressed with the user adapters' codec at this many effective bits per adapter parameter
    # (base format version 3): at 1 bit it costs ~0.05 bits per quantized weight instead of ~0.74 as float16, for
    # +0.006 nats of held-out NLL on SmolLM2's 2-bit base (docs/RESULTS.md). None keeps float16 factors (version 2).
    bits: float | None = 1.0

    def __post_init__(self) -> None:
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, (int, float))
                                      or not math.isfinite(self.bits) or not 0 < self.bits <= 16):
            raise ConfigError(f"recovery bits must be a number in (0, 16] or None (float16 factors), got {self.bits!r}")
        positive = {"rank": self.rank, "steps": self.steps, "batch_size": self.batch_size,
                    "sequences": self.sequences}
        bad = {k: v for k, v in positive.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ConfigError(f"recovery settings {bad} must be integers >= 1")
        if not isinstance(self.length, int) or self.length < 2:
            raise ConfigError(f"recovery sequence length must be an integer >= 2, got {self.length!r}")
        for name in ("alpha", "learning_rate", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"recovery {name} must be a finite number > 0, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"recovery warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
