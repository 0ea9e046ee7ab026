"""LoRA adapters on a frozen base model, keyed by adapter name.

A small, dependency-free counterpart of peft's LoRA: each adapted linear layer
is wrapped in a ``LoraLinear`` that can hold several named adapters at once.
The wrapped base is only ever used through ``base(x)``, ``in_features`` and
``out_features`` so it can later be swapped for a low-bit linear.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lowra.sdk.base_model import linear_module_names
from lowra.sdk.errors import ConfigError


@dataclass
class LoraConfig:
    """Shape and strength of one adapter: ``delta W = (alpha / rank) * B @ A``."""

    rank: int = 16
    alpha: float = 32.0
    targets: str | list[str] = "all-linear"
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
        if isinstance(self.targets, str):
            if self.targets != "all-linear":
                raise ConfigError(
                    f"LoraConfig.targets must be 'all-linear' or a list of module names, got {self.targets!r}"
                )
        else:
            targets = list(self.targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(
                    f"LoraConfig.targets must be 'all-linear' or a non-empty list of module names "
                    f"such as ['q_proj', 'v_proj'], got {self.targets!r}"
                )
            self.targets = targets

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


_RESERVED_NAMES = frozenset(dir(nn.ParameterDict())) | frozenset(dir(nn.ModuleDict()))


def _check_adapter_name(name: str) -> None:
    # Names become ParameterDict keys and state-dict path components: no dots,
    # and nothing that shadows a ParameterDict/ModuleDict attribute ("keys", "copy").
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in _RESERVED_NAMES:
        raise ConfigError(f"adapter name {name!r} is reserved by torch.nn containers; pick another name")


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
        _check_adapter_name(name)
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
        _check_adapter_name(name)
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


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA layer keyed by the path of the linear it replaced, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _current_active(model: nn.Module) -> list[str]:
    for layer in lora_layers(model).values():
        return list(layer.active)
    return []


def adapter_names(model: nn.Module) -> list[str]:
    """Names of all adapters present on at least one layer, in first-seen order."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        for n in layer.adapter_names:
            names[n] = None
    return list(names)


def _freeze_non_lora(model: nn.Module) -> None:
    for pname, param in model.named_parameters():
        is_lora = ".lora_A." in pname or ".lora_B." in pname
        if not is_lora:
            param.requires_grad_(False)


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> list[str]:
    """Add adapter ``adapter_name`` to the target linears, wrapping them on first use.

    Returns the adapted module paths. The first adapter injected into a model
    becomes active; later ones are added inactive (use ``set_active_adapters``).
    All non-LoRA parameters are frozen.
    """
    _check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ConfigError(
            f"adapter {adapter_name!r} already exists in this model; pick another name or "
            "delete_adapter() it first"
        )
    had_lora = bool(lora_layers(model))
    active = _current_active(model)
    targets = linear_module_names(model, config.targets)
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            module.active = list(active)
            _set_submodule(model, path, module)
        module.add_adapter(adapter_name, config.rank, config.scaling, config.dropout)
    if not had_lora:
        set_active_adapters(model, [adapter_name])
    _freeze_non_lora(model)
    return targets


def set_active_adapters(model: nn.Module, names: list[str] | str | None) -> None:
    """Make exactly ``names`` active on every LoRA layer (None or [] = pure base)."""
    if names is None:
        wanted: list[str] = []
    elif isinstance(names, str):
        wanted = [names]
    else:
        wanted = list(names)
    known = adapter_names(model)
    missing = [n for n in wanted if n not in known]
    if missing:
        raise ConfigError(f"adapter(s) {missing} do not exist in this model; known adapters: {known}")
    for layer in lora_layers(model).values():
        layer.active = list(wanted)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable tensors of one adapter (A then B per layer, model order)."""
    params: list[nn.Parameter] = []
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            params += [layer.lora_A[name], layer.lora_B[name]]
    if not params:
        raise ConfigError(f"adapter {name!r} does not exist in this model; known adapters: {adapter_names(model)}")
    return params


def get_adapter_factors(model: nn.Module, name: str) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module path: (A [r, in], B [out, r])}`` for one adapter, detached copies."""
    factors = {
        path: (layer.lora_A[name].detach().clone(), layer.lora_B[name].detach().clone())
        for path, layer in lora_layers(model).items()
        if name in layer.lora_A
    }
    if not factors:
        raise ConfigError(f"adapter {name!r} does not exist in this model; known adapters: {adapter_names(model)}")
    return factors


def adapter_scalings(model: nn.Module, name: str) -> dict[str, float]:
    """Per-module scaling of one adapter (normally all ``alpha / rank``)."""
    return {path: layer.scaling[name] for path, layer in lora_layers(model).items() if name in layer.scaling}


def set_adapter_factors(
    model: nn.Module,
    name: str,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    scaling: float | Mapping[str, float],
) -> None:
    """Install given factors as adapter ``name``, wrapping plain linears as needed.

    Every shape is checked before anything is changed, so a bad entry leaves the
    model untouched.
    """
    from lowra.sdk.quant.lowbit_linear import LowBitLinear  # lowbit imports this module: import when needed

    _check_adapter_name(name)
    if not factors:
        raise ConfigError(f"no factors given for adapter {name!r}")
    plan: list[tuple[str, nn.Module, Tensor, Tensor, float]] = []
    for path, pair in factors.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(
                f"module {path!r} does not exist in this model; adaptable modules: "
                f"{linear_module_names(model)[:8]}..."
            ) from None
        if not isinstance(module, (LoraLinear, nn.Linear, LowBitLinear)):
            raise ConfigError(f"module {path!r} is a {type(module).__name__}, expected a linear layer")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ConfigError(f"factors[{path!r}] must be a pair (A, B), got {type(pair).__name__}")
        a, b = pair
        in_f, out_f = int(module.in_features), int(module.out_features)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise ConfigError(
                f"factors for {path!r} have shapes A={tuple(a.shape)}, B={tuple(b.shape)}; expected "
                f"A=[r, {in_f}] and B=[{out_f}, r] with the same r"
            )
        s = scaling[path] if isinstance(scaling, Mapping) else scaling
        plan.append((path, module, a, b, float(s)))
    active = _current_active(model)
    for path, module, a, b, s in plan:
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            module.active = list(active)
            _set_submodule(model, path, module)
        module.set_factors(name, a, b, s)
    _freeze_non_lora(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter everywhere; layers left with no adapter are unwrapped."""
    layers = lora_layers(model)
    if not any(name in layer.lora_A for layer in layers.values()):
        raise ConfigError(f"adapter {name!r} does not exist in this model; known adapters: {adapter_names(model)}")
    for path, layer in layers.items():
        if name in layer.lora_A:
            layer.remove_adapter(name)
        else:
            layer.active = [n for n in layer.active if n != name]
        if not layer.adapter_names:
            _set_submodule(model, path, layer.base)


def input_stats(model: nn.Module) -> dict[str, Tensor]:
    """Mean of x**2 per input feature (float32 [in]) for every layer that saw tokens."""
    return {
        path: (layer.input_sq_sum / layer.input_count).float()
        for path, layer in lora_layers(model).items()
        if layer.input_sq_sum is not None and layer.input_count > 0
    }


@contextmanager
def recording_input_stats(model: nn.Module, reset: bool = True) -> Iterator[None]:
    """Accumulate input statistics on every LoRA layer while the block runs."""
    layers = list(lora_layers(model).values())
    previous = [layer.record_input_stats for layer in layers]
    for layer in layers:
        if reset:
            layer.reset_input_stats()
        layer.record_input_stats = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.record_input_stats = was
            layer.stats_token_mask = None


def set_stats_token_mask(model: nn.Module, mask: Tensor | None) -> None:
    """Tell every LoRA layer which tokens of the next forward count for statistics."""
    for layer in lora_layers(model).values():
        layer.stats_token_mask = mask
