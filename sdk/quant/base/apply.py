"""Quantize a whole model: ``quantize_model`` (plan, assign, pack) and the input statistics ``weighted`` needs."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from lowra.device_runtime.formats.quantized_base import QuantizedBase
from lowra.sdk.errors import ConfigError
from lowra.sdk.modules import linear_module_names
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.fit import TORCH_THREADS
from lowra.sdk.quant.base.plan import plan_model
from lowra.sdk.targets import ALL_LINEAR

__all__ = ["quantize_model", "record_input_stats"]


def quantize_model(
    model: nn.Module,
    config: QuantizeConfig,
    input_stats: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    source: str = "",
    created: str | None = None,
    timings: dict[str, float] | None = None,
    torch_threads: int | None = TORCH_THREADS,
    device: torch.device | str | None = None,
) -> QuantizedBase:
    """Quantize every targeted linear layer of ``model`` under ``config.bits`` effective bits per parameter.

    Returns the in-memory quantized base (``.write(path)`` saves it; ``.bits_report()`` and ``.report`` hold the
    measured bits and errors). The model is not modified. ``input_stats`` maps module path -> mean squared input
    per feature [in] and is used when ``config.weighted``. ``timings``, when given, receives the seconds spent
    per phase (scoring, assignment, refitting, packing, file). ``torch_threads``: see TORCH_THREADS.
    ``device``: where the codebooks are fitted (see :func:`plan_model`; default CPU).
    """
    plan = plan_model(model, config, input_stats, progress=progress, source=source, timings=timings,
                      torch_threads=torch_threads, device=device)
    return plan.quantize(config.bits, progress=progress, created=created, timings=timings, torch_threads=torch_threads)


@torch.no_grad()
def record_input_stats(
    model: nn.Module, batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]], targets: str | list[str] = ALL_LINEAR
) -> dict[str, torch.Tensor]:
    """Mean squared input per feature (float32 [in]) of every targeted linear layer over ``batches``.

    Each batch is token ids [batch, seq] or a dict of model inputs (e.g. with ``attention_mask``; padded positions
    are then left out). These are the ``input_stats`` that ``weighted=True`` needs: the error of weight ``W[r, j]``
    then counts by ``E[x_j^2]``, the expected output error, instead of equally. Plain forward hooks: works on any
    model, LoRA-wrapped or not.
    """
    names = linear_module_names(model, targets)
    sums = {n: None for n in names}
    counts = dict.fromkeys(names, 0)
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if mask[0] is not None and mask[0].numel() == x.shape[0]:
                x = x[mask[0]]
            sq = (x * x).sum(0)
            sums[name] = sq if sums[name] is None else sums[name] + sq
            counts[name] += x.shape[0]

        return record

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for batch in batches:
            inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            attention = inputs.get("attention_mask")
            mask[0] = attention.reshape(-1).bool() if attention is not None else None
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [n for n in names if counts[n] == 0]
    if unseen:
        raise ConfigError(f"no calibration tokens reached {unseen[:3]} ({len(unseen)} modules); pass non-empty batches")
    return {n: (sums[n] / counts[n]).float() for n in names}
