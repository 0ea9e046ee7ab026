"""LoraConfig: the shape and strength of one adapter (torch-free, so the CLI parser can build without torch)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from lowra.sdk.errors import ConfigError
from lowra.sdk.targets import ALL_LINEAR, check_targets


@dataclass
class LoraConfig:
    """Shape and strength of one adapter: ``delta W = (alpha / rank) * B @ A``."""

    rank: int = 16
    alpha: float = 32.0
    targets: str | list[str] = ALL_LINEAR
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoraConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ConfigError(f"LoraConfig.alpha must be a number > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.targets = check_targets(self.targets, "LoraConfig.targets")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        known = {"rank", "alpha", "targets", "dropout"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LoraConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))
