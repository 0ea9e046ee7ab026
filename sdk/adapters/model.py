"""Model-level LoRA: inject, activate, read and install factors, delete; every function keyed by adapter name.

A small, dependency-free counterpart of peft's ``LoraModel``: each adapted linear is wrapped in a
:class:`~lowra.sdk.adapters.layer.LoraLinear` that can hold several named adapters at once.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.layer import LoraLinear, check_adapter_name
from lowra.sdk.errors import ConfigError
from lowra.sdk.modules import is_linear, linear_module_names, module_at

__all__ = [
    "adapter_names",
    "adapter_parameters",
    "adapter_scalings",
    "delete_adapter",
    "get_adapter_factors",
    "inject_lora",
    "lora_layers",
    "set_active_adapters",
    "set_adapter_factors",
]


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA layer keyed by the path of the linear it replaced, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


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
    check_adapter_name(adapter_name)
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
            model.set_submodule(path, module)
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
    check_adapter_name(name)
    if not factors:
        raise ConfigError(f"no factors given for adapter {name!r}")
    plan: list[tuple[str, nn.Module, Tensor, Tensor, float]] = []
    for path, pair in factors.items():
        module = module_at(model, path)
        if not (isinstance(module, LoraLinear) or is_linear(module)):
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
            model.set_submodule(path, module)
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
            model.set_submodule(path, layer.base)
