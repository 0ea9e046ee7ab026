"""Quantize a whole model: ``quantize_model`` (calibrate, plan, assign, pack) and the calibration it needs."""
from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from lowra.device_runtime.formats.quantized_base import QuantizedBase
from lowra.sdk.errors import ConfigError
from lowra.sdk.modules import linear_module_names
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.fit import TORCH_THREADS
from lowra.sdk.quant.base.plan import plan_model
from lowra.sdk.quant.base.sensitivity import CalibrationStats, record_output_fisher
from lowra.sdk.targets import ALL_LINEAR

__all__ = ["calibrate", "quantize_model", "record_input_stats", "record_inputs"]

# Batches (of CALIBRATION_BATCH windows) the output Fisher is measured on: a backward pass costs ~2 forwards, and
# a per-layer mean settles on fewer tokens than per-input statistics (see bench/bench_base_ppl.py).
FISHER_BATCHES = 4


def calibrate(
    model: nn.Module,
    config: QuantizeConfig,
    tokenizer: Any = None,
    batches: list[Mapping[str, torch.Tensor]] | None = None,
) -> CalibrationStats:
    """Record what a calibrated ``config`` needs: E[x^2] per input of every targeted linear on ``batches`` (default:
    :func:`lowra.sdk.training.calibration.calibration_batches` of ``config.calibration`` with ``tokenizer``),
    for ``sensitivity="fisher"`` the output Fisher on the first FISHER_BATCHES of them, and for ``error_feedback``
    the input Hessian of every targeted linear (same forward passes). The model is not changed."""
    if batches is None:
        if tokenizer is None:
            raise ConfigError(
                "calibration needs the model's tokenizer (to tokenize the calibration text) or ready batches; "
                "pass tokenizer=..., or use QuantizeConfig(calibration=None) for an uncalibrated base"
            )
        from lowra.sdk.training.calibration import calibration_batches

        batches = calibration_batches(tokenizer, config.calibration or "default")
    batches = list(batches)
    input_ms, hessians = record_inputs(model, batches, config.targets, hessians=config.feeds_back)
    fisher = (
        record_output_fisher(model, batches[:FISHER_BATCHES], config.targets) if config.sensitivity == "fisher" else {}
    )
    tokens = sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
    )
    return CalibrationStats(input_ms=input_ms, output_fisher=fisher, input_hessian=hessians,
                            source=str(config.calibration), tokens=tokens)


def quantize_model(
    model: nn.Module,
    config: QuantizeConfig,
    calibration: CalibrationStats | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    source: str = "",
    created: str | None = None,
    timings: dict[str, float] | None = None,
    torch_threads: int | None = TORCH_THREADS,
    device: torch.device | str | None = None,
) -> QuantizedBase:
    """Quantize every targeted linear layer of ``model`` under ``config.bits`` effective bits per parameter.

    Returns the in-memory quantized base (``.write(path)`` saves it; ``.bits_report()`` and ``.report`` hold the
    measured bits and errors). The model is not modified. A calibrated ``config`` (the default) uses
    ``calibration`` when given, else records it with :func:`calibrate` on ``tokenizer``'s calibration batches.
    ``timings``, when given, receives the seconds spent per phase (calibration, scoring, assignment, refitting,
    packing, file). ``torch_threads``: see TORCH_THREADS (calibration's forward passes keep torch's setting).
    ``device``: where the codebooks are fitted (see :func:`plan_model`; default CPU).
    """
    if config.calibrated and calibration is None:
        start = time.perf_counter()
        calibration = calibrate(model, config, tokenizer)
        if timings is not None:
            timings["calibration"] = timings.get("calibration", 0.0) + time.perf_counter() - start
    plan = plan_model(model, config, calibration, progress=progress, source=source, timings=timings,
                      torch_threads=torch_threads, device=device)
    return plan.quantize(config.bits, progress=progress, created=created, timings=timings, torch_threads=torch_threads)


def record_input_stats(
    model: nn.Module, batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]], targets: str | list[str] = ALL_LINEAR
) -> dict[str, torch.Tensor]:
    """Mean squared input per feature (float32 [in]) of every targeted linear layer over ``batches``.

    Each batch is token ids [batch, seq] or a dict of model inputs (e.g. with ``attention_mask``; padded positions
    are then left out). These are a calibrated base's input statistics (:class:`CalibrationStats`): the error of
    weight ``W[r, j]`` then counts by ``E[x_j^2]``, the expected output error, instead of equally. Plain forward hooks: works on any
    model, LoRA-wrapped or not.
    """
    return record_inputs(model, batches, targets)[0]


@torch.no_grad()
def record_inputs(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    targets: str | list[str] = ALL_LINEAR,
    hessians: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(:func:`record_input_stats`, and with ``hessians`` each layer's input Hessian E[x x^T] (float32 [in, in])
    in the same forward passes; else an empty dict). The Hessian's products run in float32 per batch and add up in
    float64; layers fed the very same input tensor (q/k/v, gate/up) share one product."""
    names = linear_module_names(model, targets)
    sums = {n: None for n in names}
    outer: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    mask: list[torch.Tensor | None] = [None]
    last: list = [None, None]  # the last input tensor seen and its x^T x

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if mask[0] is not None and mask[0].numel() == x.shape[0]:
                x = x[mask[0]]
            x64 = x.to(torch.float64)
            sq = (x64 * x64).sum(0)
            sums[name] = sq if sums[name] is None else sums[name] + sq
            counts[name] += x.shape[0]
            if hessians:
                if last[0] is not args[0]:
                    x32 = x.to(torch.float32)
                    last[0], last[1] = args[0], (x32.T @ x32).to(torch.float64)
                outer[name] = last[1].clone() if name not in outer else outer[name].add_(last[1])

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
    return (
        {n: (sums[n] / counts[n]).float() for n in names},
        {n: (outer[n] / counts[n]).float() for n in outer},
    )
