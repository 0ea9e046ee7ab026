"""Model surgery every sdk layer shares: which modules count as linears, and which of them a config targets.

A leaf module (torch only), so that LoRA layers, low-bit layers and base loading all import it and none of them
imports another to learn what a linear is. Layer classes register themselves here:

- a *linear* (``nn.Linear``, ``LowBitLinear``) computes ``x @ W^T + b`` and exposes ``in_features`` /
  ``out_features``;
- a *linear wrapper* (``LoraLinear``) holds a linear at ``.base`` and stands for it (target selection sees the
  wrapper, quantization replaces its base).

Replacing a module in place is ``nn.Module.set_submodule``; there is no helper for it here.
"""
from __future__ import annotations

from typing import Iterable, TypeVar

from torch import nn

from lowra.sdk.errors import ConfigError
from lowra.sdk.targets import ALL_LINEAR, check_targets

__all__ = [
    "adaptable_linears",
    "is_linear",
    "is_linear_wrapper",
    "linear_module_names",
    "output_head",
    "register_linear",
    "register_linear_wrapper",
]

ModuleType = TypeVar("ModuleType", bound=type[nn.Module])

_LINEARS: tuple[type[nn.Module], ...] = (nn.Linear,)
_WRAPPERS: tuple[type[nn.Module], ...] = ()


def register_linear(cls: ModuleType) -> ModuleType:
    """Class decorator: instances of ``cls`` count as linear layers (targetable, quantizable, adaptable)."""
    global _LINEARS
    if cls not in _LINEARS:
        _LINEARS = (*_LINEARS, cls)
    return cls


def register_linear_wrapper(cls: ModuleType) -> ModuleType:
    """Class decorator: instances of ``cls`` wrap a linear at ``.base`` and count as that linear."""
    global _WRAPPERS
    if cls not in _WRAPPERS:
        _WRAPPERS = (*_WRAPPERS, cls)
    return cls


def is_linear(module: object) -> bool:
    """True for a registered linear layer itself (not a wrapper around one)."""
    return isinstance(module, _LINEARS)


def is_linear_wrapper(module: object) -> bool:
    """True for a registered wrapper (e.g. ``LoraLinear``) whose ``.base`` is the linear it stands for."""
    return isinstance(module, _WRAPPERS)


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection (``get_output_embeddings()``), never adapted or quantized as a linear."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def adaptable_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear layer in model order except the output head, a wrapper counted as the linear it wraps.

    A ``LowBitLinear`` counts as a linear too, so LoRA can be injected before or after the base is quantized.
    """
    head = output_head(model)
    found: list[tuple[str, nn.Module]] = []
    inside_wrapper: list[str] = []
    for name, module in model.named_modules():
        if inside_wrapper and name.startswith(inside_wrapper[-1] + "."):
            continue
        if is_linear_wrapper(module):
            inside_wrapper.append(name)
            found.append((name, module))
        elif is_linear(module):
            if module is head or name.split(".")[-1] == "lm_head":
                continue
            found.append((name, module))
    return found


def linear_module_names(model: nn.Module, targets: str | Iterable[str] = ALL_LINEAR) -> list[str]:
    """Full paths of the linear layers ``targets`` selects, in model order.

    ``"all-linear"`` is every linear except the output head; a list of names selects modules whose last path
    component is in the list.
    """
    wanted = check_targets(targets)
    candidates = [name for name, _ in adaptable_linears(model)]
    if wanted == ALL_LINEAR:
        return candidates
    available = sorted({name.split(".")[-1] for name in candidates})
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise ConfigError(
            f"target module name(s) {unknown} match no linear layer of this model; available names: {available}"
        )
    return [name for name in candidates if name.split(".")[-1] in wanted]


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``; a path the model does not have is a ConfigError that lists adaptable ones."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(
            f"module {path!r} does not exist in this model; adaptable modules: {linear_module_names(model)[:8]}..."
        ) from None
