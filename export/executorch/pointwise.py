"""Rotary embedding and the gated MLP's activation as one op each in an exported program: ``lowra::rope`` and
``lowra::silu_mul``, and the swaps that use them.

Lowered from transformers' Llama-style code, the rotary embedding of q and k is 16 portable kernels per layer
(``unsqueeze``, ``slice_copy``, ``neg``, ``cat``, ``mul``, ``add``; ``rotate_half``) and the MLP's ``act_fn(gate) *
up`` three (``sigmoid``, two ``mul``); perf of a 4-bit SmolLM2 decode step put ExecuTorch's portable and optimized
kernels at ~8% of the samples, the dispatch of ~500 small calls per step included. Here:

- ``lowra::rope(x, cos, sin)``: ``x * cos + rotate_half(x) * sin`` for ``x`` float32 ``[B, H, S, D]`` and ``cos`` /
  ``sin`` float32 ``[B, S, D]`` (broadcast over heads), ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``:
  transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``;
- ``lowra::silu_mul(gate, up)``: ``silu(gate) * up`` (``silu(g) = g / (1 + exp(-g))``), float32, same shapes.

Neither is assumed of a model: :func:`lowra_rope` and :func:`use_lowra_gated_mlp` check each replacement against the
code it replaces on random inputs and leave a model family whose rotary embedding or MLP computes something else as
it is. The native
kernels are in ``lowbit_kernels.cpp``; the references below are plain torch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lowra.device_runtime.errors import ConfigError
from lowra.sdk.quant.ops import NAMESPACE, out_variant

__all__ = ["LowraGatedMLP", "lowra_rope", "rope_reference", "silu_mul_reference", "use_lowra_gated_mlp"]

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_LIB.define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor")
_LIB.define("rope.out(Tensor x, Tensor cos, Tensor sin, *, Tensor(a!) out) -> Tensor(a!)")
_LIB.define("silu_mul(Tensor gate, Tensor up) -> Tensor")
_LIB.define("silu_mul.out(Tensor gate, Tensor up, *, Tensor(a!) out) -> Tensor(a!)")


def _check_rope(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    ok = (x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and x.dtype == cos.dtype == sin.dtype
          == torch.float32 and x.shape[3] % 2 == 0 and cos.shape[0] in (1, x.shape[0]) and cos.shape[1] == x.shape[2]
          and cos.shape[2] == x.shape[3])
    if not ok:
        raise ConfigError(f"lowra::rope got x {x.dtype} {list(x.shape)}, cos {list(cos.shape)}, sin "
                          f"{list(sin.shape)}; expected float32 x [B, H, S, D] (D even) and cos = sin [B or 1, S, D]")


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The op in plain torch: transformers' ``apply_rotary_pos_emb`` for one tensor (see the module docstring)."""
    _check_rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.unsqueeze(1)) + (rotated * sin.unsqueeze(1))


def _check_silu_mul(gate: Tensor, up: Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != torch.float32 or up.dtype != torch.float32:
        raise ConfigError(f"lowra::silu_mul got gate {gate.dtype} {list(gate.shape)} and up {up.dtype} "
                          f"{list(up.shape)}; expected float32 tensors of one shape")


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    """The op in plain torch: ``silu(gate) * up``."""
    _check_silu_mul(gate, up)
    return torch.nn.functional.silu(gate) * up


_LIB.impl("rope", rope_reference, "CompositeExplicitAutograd")
_LIB.impl("rope.out", out_variant(rope_reference), "CompositeExplicitAutograd")
_LIB.impl("silu_mul", silu_mul_reference, "CompositeExplicitAutograd")
_LIB.impl("silu_mul.out", out_variant(silu_mul_reference), "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::rope", lib=_LIB)
def _rope_fake(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    _check_rope(x, cos, sin)
    return torch.empty_like(x)


@torch.library.register_fake(f"{NAMESPACE}::silu_mul", lib=_LIB)
def _silu_mul_fake(gate: Tensor, up: Tensor) -> Tensor:
    _check_silu_mul(gate, up)
    return torch.empty_like(gate)


def lowra_apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
                               ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` on ``lowra::rope`` (heads on dimension 1 only)."""
    if unsqueeze_dim != 1:
        raise ConfigError(f"lowra::rope rotates [B, H, S, D] tensors (unsqueeze_dim=1); got unsqueeze_dim={unsqueeze_dim}")
    return torch.ops.lowra.rope(q, cos, sin), torch.ops.lowra.rope(k, cos, sin)


class LowraGatedMLP(nn.Module):
    """A Llama-style MLP, ``down_proj(silu(gate_proj(x)) * up_proj(x))``, with the activation and product in
    ``lowra::silu_mul`` (the projections are the replaced module's, unchanged)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(torch.ops.lowra.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


def _rope_modules(model: nn.Module) -> list[Any]:
    """The modeling modules whose ``apply_rotary_pos_emb`` computes what ``lowra::rope`` does (checked on random q, k,
    cos and sin of this model's head size)."""
    modules = []
    generator = torch.Generator().manual_seed(0)
    for module in {type(m).__module__ for m in model.modules() if hasattr(m, "head_dim")}:
        original = getattr(sys.modules.get(module), "apply_rotary_pos_emb", None)
        if original is None:
            continue
        head_dim = next(int(m.head_dim) for m in model.modules() if type(m).__module__ == module
                        and hasattr(m, "head_dim"))
        if head_dim % 2:
            continue
        q, k = (torch.randn(1, 3, 5, head_dim, generator=generator) for _ in range(2))
        cos, sin = (torch.randn(1, 5, head_dim, generator=generator) for _ in range(2))
        try:
            want = original(q, k, cos, sin)
        except Exception:  # noqa: BLE001, S112 - another signature: not the function lowra::rope replaces
            continue
        if (isinstance(want, tuple) and len(want) == 2 and _same(want[0], rope_reference(q, cos, sin))
                and _same(want[1], rope_reference(k, cos, sin))):
            modules.append(sys.modules[module])
    return modules


def _in_features(linear: nn.Module) -> int | None:
    """A linear's input size: its own, its base's (a side-branch wrapper), or its weight's."""
    for module in (linear, getattr(linear, "base", None)):
        if isinstance(getattr(module, "in_features", None), int):
            return module.in_features
    weight = getattr(linear, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, Tensor) and weight.dim() == 2 else None


def _gated_mlps(model: nn.Module) -> list[str]:
    """Paths of the MLPs that compute ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (checked on a random input)."""
    paths = []
    generator = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if not name or not all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        in_features = _in_features(module.gate_proj)
        if in_features is None:
            continue
        x = torch.randn(1, 2, in_features, generator=generator)
        with torch.no_grad():
            try:
                if _same(module(x), LowraGatedMLP(module)(x)):
                    paths.append(name)
            except Exception:  # noqa: BLE001, S112 - not a module this swap understands: left as it is
                continue
    return paths


def use_lowra_gated_mlp(model: nn.Module) -> int:
    """Swap every Llama-style gated MLP of ``model`` (already a private copy) for :class:`LowraGatedMLP` where it
    computes the same; returns how many were swapped."""
    mlps = _gated_mlps(model)
    for name in mlps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowraGatedMLP(getattr(parent, child)))
    return len(mlps)


@contextlib.contextmanager
def lowra_rope(model: nn.Module) -> Iterator[int]:
    """Within the block (the export trace), the modeling modules of ``model`` whose ``apply_rotary_pos_emb`` computes
    what ``lowra::rope`` does call it instead (their attention looks the function up when it runs); yields how many
    modules were switched, restored on exit."""
    saved = [(module, module.apply_rotary_pos_emb) for module in _rope_modules(model)]
    try:
        for module, _ in saved:
            module.apply_rotary_pos_emb = lowra_apply_rotary_pos_emb
        yield len(saved)
    finally:
        for module, original in saved:
            module.apply_rotary_pos_emb = original
