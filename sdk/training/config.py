"""TrainConfig: the optimizer and batching settings of one adapter's training run (torch-free, for the CLI parser)."""
from __future__ import annotations

from dataclasses import dataclass

from lowra.sdk.errors import ConfigError


@dataclass
class TrainConfig:
    steps: int = 60
    batch_size: int = 4
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_len: int = 160
    seed: int = 0
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if self.max_len < 2:
            raise ConfigError(f"TrainConfig.max_len must be >= 2, got {self.max_len}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ConfigError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
