"""LoraLinear: a frozen linear layer plus any number of named low-rank adapters (peft's per-adapter state).

The wrapped base is only ever used through ``base(x)``, ``in_features`` and ``out_features`` so it can be a plain
``nn.Linear`` or a low-bit linear; the class registers as a linear *wrapper* in :mod:`lowra.sdk.modules`, so
target selection sees it as the linear it wraps.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lowra.sdk.errors import ConfigError
from lowra.sdk.modules import register_linear_wrapper

__all__ = ["LoraLinear", "check_adapter_name"]

_RESERVED_NAMES = frozenset(dir(nn.ParameterDict())) | frozenset(dir(nn.ModuleDict()))


def check_adapter_name(name: str) -> None:
    # Names become ParameterDict keys and state-dict path components: no dots,
    # and nothing that shadows a ParameterDict/ModuleDict attribute ("keys", "copy").
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in _RESERVED_NAMES:
        raise ConfigError(f"adapter name {name!r} is reserved by torch.nn containers; pick another name")


@register_linear_wrapper
class LoraLinear(nn.Module):
    """A frozen linear layer plus any number of named low-rank adapters."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = int(base.in_features)
        self.out_features: int = int(base.out_features)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.record_input_stats: bool = False
        # Set by the trainer per batch so padding tokens do not skew the statistics.
        self.stats_token_mask: Tensor | None = None
        # Plain attributes, not buffers: statistics must not leak into state_dict.
        self.input_sq_sum: Tensor | None = None
        self.input_count: int = 0

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, rank: int, scaling: float, dropout: float = 0.0) -> None:
        check_adapter_name(name)
        if name in self.lora_A:
            raise ConfigError(f"adapter {name!r} already exists on this layer; delete it first")
        ref = self._param_ref()
        a = torch.empty(rank, self.in_features, dtype=torch.float32, device=ref.device)
        # Same init as peft so adapters start from the same distribution.
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, rank, dtype=torch.float32, device=ref.device)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.scaling[name] = float(scaling)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def set_factors(self, name: str, a: Tensor, b: Tensor, scaling: float) -> None:
        check_adapter_name(name)
        dev = self._param_ref().device
        self.lora_A[name] = nn.Parameter(a.detach().to(device=dev, dtype=torch.float32).clone())
        self.lora_B[name] = nn.Parameter(b.detach().to(device=dev, dtype=torch.float32).clone())
        self.scaling[name] = float(scaling)
        if name not in self.lora_dropout:
            self.lora_dropout[name] = nn.Identity()

    def remove_adapter(self, name: str) -> None:
        del self.lora_A[name]
        del self.lora_B[name]
        del self.lora_dropout[name]
        del self.scaling[name]
        self.active = [n for n in self.active if n != name]

    def delta_weight(self, name: str) -> Tensor:
        """``scaling * B @ A`` as a [out, in] tensor: the only place the delta is formed."""
        return self.scaling[name] * (self.lora_B[name] @ self.lora_A[name])

    def reset_input_stats(self) -> None:
        self.input_sq_sum = None
        self.input_count = 0

    def _param_ref(self) -> Tensor:
        for t in self.base.parameters():
            return t
        for t in self.base.buffers():
            return t
        return torch.empty(0)

    @torch.no_grad()
    def _accumulate_stats(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        mask = self.stats_token_mask
        if mask is not None and mask.numel() == flat.shape[0]:
            flat = flat[mask.reshape(-1).to(device=flat.device, dtype=torch.bool)]
        # Reduce in fp32 (cheap) and accumulate in fp64 (many batches).
        sq = flat.float().pow(2).sum(dim=0).double()
        if self.input_sq_sum is None or self.input_sq_sum.device != sq.device:
            self.input_sq_sum = torch.zeros(self.in_features, dtype=torch.float64, device=sq.device)
        self.input_sq_sum += sq
        self.input_count += int(flat.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if self.record_input_stats:
            self._accumulate_stats(x)
        out = self.base(x)
        for name in self.active:
            if name not in self.lora_A:
                # An adapter may cover only some layers; elsewhere it is a no-op.
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x).to(a.dtype)
            out = out + (F.linear(F.linear(h, a), b) * self.scaling[name]).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        ranks = {n: int(self.lora_A[n].shape[0]) for n in self.lora_A}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}, active={self.active}"
