"""RMS normalization as one op in an exported program: ``lowra::rms_norm``, and the module swap that uses it.

Lowered from transformers' ``LlamaRMSNorm``, each norm is six portable kernels (``pow``, ``mean``, ``add``,
``rsqrt``, two ``mul``), and the portable ``pow`` calls ``std::pow`` per element: ETDump put ``pow`` alone at 0.57 ms
of a ~12 ms SmolLM2 decode step (61 norms). ``lowra::rms_norm(x, weight, eps)`` is one pass over each row:

    weight * (x * rsqrt(mean(x^2, -1) + eps))        x float32 [..., D], weight float32 [D]

the formula of the RMSNorm classes of Llama, Qwen2, Mistral and SmolLM (``variance_epsilon``; others are left as
they are). The native kernel is in ``lowbit_kernels.cpp``; the reference below is plain torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowra.device_runtime.errors import ConfigError
from lowra.sdk.quant.ops import NAMESPACE, out_variant

__all__ = ["LowraRMSNorm", "rms_norm_reference", "use_lowra_rms_norm"]

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_LIB.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_LIB.define("rms_norm.out(Tensor x, Tensor weight, float eps, *, Tensor(a!) out) -> Tensor(a!)")


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.dim() != 1 or x.dim() < 1 \
            or x.shape[-1] != weight.shape[0]:
        raise ConfigError(f"lowra::rms_norm got x {x.dtype} {list(x.shape)} and weight {weight.dtype} "
                          f"{list(weight.shape)}; expected float32 x [..., D] and weight [D]")


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The op in plain torch: transformers' LlamaRMSNorm in float32."""
    _check(x, weight)
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


_LIB.impl("rms_norm", rms_norm_reference, "CompositeExplicitAutograd")
_LIB.impl("rms_norm.out", out_variant(rms_norm_reference), "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::rms_norm", lib=_LIB)
def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check(x, weight)
    return torch.empty_like(x)


class LowraRMSNorm(nn.Module):
    """An RMSNorm module computed by ``lowra::rms_norm`` (the weight is the replaced module's, in float32)."""

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.variance_epsilon = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.lowra.rms_norm(x, self.weight, self.variance_epsilon)


def _is_llama_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "variance_epsilon", None), float)
            and isinstance(weight, Tensor) and weight.dim() == 1)


def use_lowra_rms_norm(model: nn.Module) -> int:
    """Swap every Llama-style RMSNorm of ``model`` (already a private copy) for :class:`LowraRMSNorm`; returns how
    many were swapped."""
    targets = [name for name, module in model.named_modules() if name and _is_llama_rms_norm(module)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, LowraRMSNorm(old.weight, old.variance_epsilon))
    return len(targets)
