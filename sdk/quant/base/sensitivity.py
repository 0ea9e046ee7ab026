"""How much the model's loss feels an error in each layer's output: the empirical Fisher of its outputs.

An error ``dy`` on output ``r`` of a layer raises the loss by about ``1/2 E[g_r^2] E[dy_r^2]`` (second-order Taylor
expansion with the Fisher for the Hessian; ``g_r``: the loss gradient w.r.t. that output, per token). With
``dy = (W - Q(W)) x``, ``E[dy_r^2] ~ sum_j E[x_j^2] (W - Q(W))_rj^2`` -- the row's expected output error, which
the plan already scores -- so the knapsack's cost of a row is its output error times the layer's mean
``E[g_r^2]`` (per layer: per-row gradients are noisy on a few thousand tokens; see bench/bench_base_ppl.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from lowra.sdk.errors import ConfigError
from lowra.sdk.modules import linear_module_names
from lowra.sdk.quant.adapter_compression import STATS_FLOOR
from lowra.sdk.targets import ALL_LINEAR


def record_output_fisher(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], targets: str | list[str] = ALL_LINEAR
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the next-token loss (summed over tokens) w.r.t. every output of every targeted
    linear layer (float32 [out]) over ``batches`` (dicts with ``input_ids`` and optionally ``attention_mask``).

    No parameter gradient is computed or kept (their ``requires_grad`` is restored); gradients flow from the input
    embeddings, so the model needs ``get_input_embeddings()``. Padded positions are left out.
    """
    names = linear_module_names(model, targets)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None:
        raise ConfigError(
            f"{type(model).__name__} has no get_input_embeddings(): the Fisher sensitivity needs gradients from the "
            "input embeddings; use QuantizeConfig(sensitivity='none')"
        )
    sums: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    counts = dict.fromkeys(names, 0)
    mask: list[torch.Tensor | None] = [None]

    def watch(name: str):
        def forward(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            keep = mask[0]

            def record(grad: torch.Tensor) -> None:
                g = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float64)
                if keep is not None and keep.numel() == g.shape[0]:
                    g = g[keep]
                sq = (g * g).sum(0)
                sums[name] = sq if sums[name] is None else sums[name] + sq
                counts[name] += g.shape[0]

            if output.requires_grad:
                output.register_hook(record)

        return forward

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(watch(n)) for n in names]
    handles.append(embeddings.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)))
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(False)
        for batch in batches:
            ids = batch["input_ids"]
            attention = batch.get("attention_mask")
            mask[0] = attention.reshape(-1).bool() if attention is not None else None
            out = model(input_ids=ids, attention_mask=attention) if attention is not None else model(input_ids=ids)
            logits = getattr(out, "logits", out)[:, :-1].float()
            labels = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100) if attention is not None else ids[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    unseen = [n for n in names if counts[n] == 0]
    if unseen:
        raise ConfigError(f"no calibration gradient reached {unseen[:3]} ({len(unseen)} modules); pass non-empty "
                          "batches")
    return {n: (sums[n] / counts[n]).float() for n in names}


@dataclass
class CalibrationStats:
    """What calibration measured: E[x^2] per input of every linear, (for ``sensitivity="fisher"``) the empirical
    Fisher of its outputs, and (for ``error_feedback``) the Hessian of its inputs, E[x x^T]. Recorded by
    :func:`lowra.sdk.quant.base.apply.calibrate`; the Hessians stay in memory, never in the file."""

    input_ms: dict[str, torch.Tensor]  # module path -> float32 [in]
    output_fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> float32 [out]
    input_hessian: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> float32 [in, in]
    source: str = ""  # what text: "default", a folder, or a caller's own description
    tokens: int = 0  # calibration tokens the input statistics were recorded on

    def layer_sensitivity(self, names: list[str], kind: str) -> dict[str, float]:
        """Per layer, the weight of its rows' output errors in the knapsack, normalized to mean 1 over ``names``:
        1 everywhere for ``"none"``, the mean output Fisher for ``"fisher"`` (floored like input statistics, so a
        layer the loss never felt still costs a little)."""
        if kind == "none":
            return dict.fromkeys(names, 1.0)
        missing = [n for n in names if n not in self.output_fisher]
        if missing:
            raise ConfigError(
                f"sensitivity={kind!r} needs the output Fisher of every targeted module; missing {missing[:3]} "
                f"({len(missing)} of {len(names)}). Record it with calibrate(...) or use sensitivity='none'"
            )
        raw = {n: float(self.output_fisher[n].double().mean()) for n in names}
        if not all(math.isfinite(v) and v >= 0 for v in raw.values()):
            raise ConfigError("the output Fisher has NaN/Inf or negative values; recalibrate on finite inputs")
        mean = sum(raw.values()) / len(raw)
        if mean <= 0:
            return dict.fromkeys(names, 1.0)
        return {n: max(v, STATS_FLOOR * mean) / mean for n, v in raw.items()}
