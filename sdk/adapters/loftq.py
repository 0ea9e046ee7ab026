"""LoftQ initialization (Li et al. 2023, arXiv 2310.08659, Algorithm 1) for LoRA on a low-bit base.

Plain QLoRA-style training starts from ``Q = quantize(W)`` with ``B = 0``, so the adapter first has to learn the
whole quantization error ``W - deq(Q)``. LoftQ alternates the two halves of ``W ~ deq(Q) + s * B @ A``:

    Q_t      = quantize(W - s * B_{t-1} @ A_{t-1})
    A_t, B_t = rank-r SVD of (W - deq(Q_t)) / s, sqrt(Sigma) split across the two factors

so the adapter starts out absorbing the part of the residual a rank-r matrix can hold. The quantizer is any
callable returning a :class:`QuantizedWeight` (LowRA's learned codebooks in production, a fixed-level one in tests);
because it is a heuristic rather than an exact projection, a step can make the residual worse. Such a step is
rejected and the iteration stops, so the returned residual norms never increase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.errors import ConfigError
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.layer import LoraLinear
from lowra.sdk.adapters.model import lora_layers
from lowra.sdk.modules import is_linear
from lowra.sdk.quant.lowbit_linear import LowBitLinear, replace_linears

__all__ = ["LoftQResult", "loftq_init", "loftq_weight", "lowrank_factors", "residual_init"]

# Randomized SVD for layers much larger than the rank: extra columns sampled and power iterations. On SmolLM2's
# NF2 residuals (flat spectra, the hard case) niter=4 leaves a rank-16 residual 0.2-0.3% above the exact SVD's.
RANDOMIZED_OVERSAMPLE = 10
RANDOMIZED_ITERS = 4


@dataclass
class LoftQResult:
    """The kept iterate of one weight: ``W ~ deq(quantized) + scaling * lora_B @ lora_A``."""

    quantized: QuantizedWeight
    lora_A: Tensor  # [rank, in]
    lora_B: Tensor  # [out, rank]
    # ||W - deq(Q) - s*B@A||_F of the kept iterate after each step run; non-increasing by construction.
    residual_norms: list[float]
    # ||W - deq(quantize(W))||_F: the residual of plain quantization with the usual zero-initialized B.
    zero_init_norm: float
    # Steps run (<= steps): the iteration stops at the first step that fails to improve the residual.
    steps_run: int


def lowrank_factors(residual: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(A [rank, in], B [out, rank])`` with ``B @ A`` the best rank-``rank`` approximation of ``residual``.

    sqrt(Sigma) goes to both factors (LoftQ's split), so A and B start at the same scale and neither dominates
    the first optimizer steps. A rank above ``min(out, in)`` is padded with zero components.
    """
    out_features, in_features = residual.shape
    small = min(out_features, in_features)
    if small > 4 * (rank + RANDOMIZED_OVERSAMPLE):
        # Randomized range finder (Halko et al. 2011) with power iterations: a full SVD of a 1536x576 layer takes
        # ~6x longer here, and LoftQ needs one per layer per step. Seeded, so the factors are reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, sigma, v = torch.svd_lowrank(residual.float(), q=rank + RANDOMIZED_OVERSAMPLE, niter=RANDOMIZED_ITERS)
        vh = v.T
    else:
        u, sigma, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    keep = min(rank, sigma.shape[0])
    root = sigma[:keep].sqrt()
    a = residual.new_zeros((rank, in_features), dtype=torch.float32)
    b = residual.new_zeros((out_features, rank), dtype=torch.float32)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root[None, :]
    return a, b


def _decode(qw: QuantizedWeight, device: torch.device) -> Tensor:
    return LowBitLinear.from_quantized(qw, device=device).dequantize()


def _check_quantized(qw: object, weight: Tensor) -> QuantizedWeight:
    if not isinstance(qw, QuantizedWeight):
        raise ConfigError(f"the quantize callable returned a {type(qw).__name__}; expected a QuantizedWeight")
    if (qw.out_features, qw.in_features) != tuple(weight.shape):
        raise ConfigError(
            f"the quantize callable returned a [{qw.out_features}, {qw.in_features}] weight for a "
            f"{list(weight.shape)} input; it must quantize the matrix it is given"
        )
    return qw


def loftq_weight(
    weight: Tensor,
    rank: int,
    scaling: float,
    quantize: Callable[[Tensor], QuantizedWeight],
    steps: int = 5,
) -> LoftQResult:
    """Run LoftQ's alternation on one ``[out, in]`` weight, on whatever device ``weight`` lives on."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoftQ rank must be an integer >= 1, got {rank!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"LoftQ steps must be an integer >= 1 (1 = quantize once, then SVD), got {steps!r}")
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise ConfigError(f"LoftQ scaling (LoRA alpha / rank) must be a finite number > 0, got {scaling!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ConfigError(f"LoftQ needs a floating-point [out, in] weight, got {weight.dtype} {list(weight.shape)}")
    w = weight.detach().float()
    device = w.device

    qw = _check_quantized(quantize(w), w)
    residual = w - _decode(qw, device)
    zero_init_norm = float(torch.linalg.matrix_norm(residual))
    a, b = lowrank_factors(residual / scaling, rank)
    best = (qw, a, b, float(torch.linalg.matrix_norm(residual - scaling * (b @ a))))
    norms = [best[3]]
    steps_run = 1
    for _ in range(1, steps):
        steps_run += 1
        qw = _check_quantized(quantize(w - scaling * (best[2] @ best[1])), w)
        residual = w - _decode(qw, device)
        a, b = lowrank_factors(residual / scaling, rank)
        norm = float(torch.linalg.matrix_norm(residual - scaling * (b @ a)))
        if not norm < best[3]:
            norms.append(best[3])
            break
        best = (qw, a, b, norm)
        norms.append(norm)
    return LoftQResult(
        quantized=best[0], lora_A=best[1], lora_B=best[2], residual_norms=norms,
        zero_init_norm=zero_init_norm, steps_run=steps_run,
    )  # fmt: skip


def loftq_init(
    model: nn.Module,
    fp_weights: Mapping[str, Tensor] | None,
    lora: LoraConfig,
    quantize_fn: Callable[[str, Tensor], QuantizedWeight],
    steps: int = 5,
    adapter_name: str = "default",
) -> dict[str, LoftQResult]:
    """Quantize the base of every LoRA layer with LoftQ and start adapter ``adapter_name`` on its residual.

    ``fp_weights`` maps module paths (as in ``lora_layers(model)``) to their full-precision weights; ``None``
    takes them from the LoRA layers whose base is still an ``nn.Linear`` and carries ``adapter_name``. Each
    path must be a ``LoraLinear`` (call ``inject_lora`` first) over an ``nn.Linear`` or ``LowBitLinear``.
    ``quantize_fn(path, W)`` quantizes one layer (the path lets it look up that layer's width plan and input
    statistics). Afterwards each base is a ``LowBitLinear`` holding LoftQ's ``Q`` and the adapter holds
    ``(A, B)`` with scaling ``lora.scaling``; ``train_adapter`` then trains from there. Every weight is
    processed before the model changes, so a failure leaves it untouched.
    """
    layers = lora_layers(model)
    if fp_weights is None:
        fp_weights = {
            path: layer.base.weight
            for path, layer in layers.items()
            if isinstance(layer.base, nn.Linear) and adapter_name in layer.lora_A
        }
        if not fp_weights:
            raise ConfigError(
                f"no LoRA layer with adapter {adapter_name!r} over a full-precision nn.Linear was found; call "
                "inject_lora(model, lora, adapter_name) on the fp model first, or pass fp_weights explicitly"
            )
    for path, weight in fp_weights.items():
        layer = layers.get(path)
        if layer is None:
            raise ConfigError(
                f"module {path!r} is not a LoRA layer of this model; call inject_lora(model, lora) first "
                f"(LoRA layers: {list(layers)[:4]}...)"
            )
        if not is_linear(layer.base):
            raise ConfigError(
                f"the base of {path!r} is a {type(layer.base).__name__}; expected nn.Linear or LowBitLinear"
            )
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ConfigError(
                f"fp_weights[{path!r}] has shape {list(weight.shape)}; the layer is "
                f"[{layer.out_features}, {layer.in_features}]"
            )
    results = {
        path: loftq_weight(weight, lora.rank, lora.scaling, partial(quantize_fn, path), steps)
        for path, weight in fp_weights.items()
    }
    replace_linears(model, {path: r.quantized for path, r in results.items()})
    for path, result in results.items():
        layer: LoraLinear = layers[path]
        layer.set_factors(adapter_name, result.lora_A, result.lora_B, lora.scaling)
    return results


@torch.no_grad()
def residual_init(
    model: nn.Module, fp_weights: Mapping[str, Tensor], lora: LoraConfig, adapter_name: str = "default"
) -> dict[str, tuple[float, float]]:
    """Start adapter ``adapter_name`` on the residual of a *shared* low-bit base: LoftQ's factor step with Q fixed.

    :func:`loftq_init` re-quantizes each base weight around its adapter, so every user would get its own base; a
    fleet shares one base file. Here the base stays as it is and the factors start as the best rank-r
    approximation of ``(W_fp - W_base) / scaling`` (``W_base`` with the base's recovery adapter, if any), so the
    adapter's first step already undoes what a rank-r matrix can of the quantization error. ``fp_weights`` maps the
    adapter's module paths to the full-precision weights the base was quantized from. Returns per layer the
    relative residual ``|W_fp - W_base| / |W_fp|`` before and after the init.
    """
    layers = {p: l for p, l in lora_layers(model).items() if adapter_name in l.lora_A}
    if not layers:
        raise ConfigError(f"adapter {adapter_name!r} is on no layer of this model; call inject_lora first")
    missing = [p for p in layers if p not in fp_weights]
    if missing:
        raise ConfigError(f"no full-precision weight for {missing[:3]}; pass the base the quantized one came from")
    factors, norms = {}, {}
    for path, layer in layers.items():
        base = layer.base
        q = base.effective_weight() if hasattr(base, "effective_weight") else base.weight
        w = fp_weights[path].to(device=q.device, dtype=torch.float32)
        if tuple(w.shape) != tuple(q.shape):
            raise ConfigError(f"fp weight of {path!r} is {list(w.shape)}, the base layer's {list(q.shape)}")
        residual = w - q.float()
        a, b = lowrank_factors(residual / lora.scaling, lora.rank)
        after = residual - lora.scaling * (b @ a)
        scale = float(w.norm()) or 1.0
        norms[path] = (float(residual.norm()) / scale, float(after.norm()) / scale)
        factors[path] = (a, b)
    for path, (a, b) in factors.items():
        layers[path].set_factors(adapter_name, a, b, lora.scaling)
    return norms
