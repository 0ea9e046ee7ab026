"""The accuracy-recovery adapter: one LoRA adapter per low-bit base, trained once by distillation, part of the base.

A low-bit base loses accuracy the user adapters then spend their capacity on. Apple's on-device model ships its
2/4-bit base with an accuracy-recovery adapter trained once; lowra does the same: :func:`train_recovery` fits one
LoRA adapter on the quantized model so its next-token distribution matches the full-precision model's (KL divergence
on generic text, the calibration set: sample users' training answers + pydoc topics, or a folder), and
:func:`recover_quantized_base` stores it in the base file (compressed with the user adapters' codec, format version
3, or as float16 factors, version 2; docs/FORMAT.md). From then on the
recovery adapter *is* the base: the SDK's ``LowBitLinear`` computes ``decode + scaling * B @ A``, the device runtime
decodes the same weight, the fingerprint covers it (user adapters trained on it bind to it), and a user swap only
ever touches the user's own part.

Training runs on a float copy of the quantized weights (the decoded weight in an ``nn.Linear``): the same function
as the packed layer, and the dense matmul is what a CPU runs fastest.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lowra.device_runtime.formats.quantized_base import QuantizedBase, Recovery, read_quantized_base
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.model import (
    adapter_parameters,
    delete_adapter,
    get_adapter_factors,
    inject_lora,
    set_active_adapters,
)
from lowra.sdk.errors import BudgetError, ConfigError
from lowra.sdk.quant.base.config import RecoveryConfig
from lowra.sdk.quant.lowbit_linear import load_quantized_base, lowbit_layers
from lowra.sdk.training.calibration import calibration_batches
from lowra.sdk.training.train import GRAD_CLIP, lr_factor

__all__ = ["RecoveryConfig", "compress_recovery", "densify_lowbit", "recover_quantized_base", "train_recovery"]

ADAPTER_NAME = "lowra_recovery"


@torch.no_grad()
def densify_lowbit(model: nn.Module) -> nn.Module:
    """Replace every ``LowBitLinear`` of ``model`` by an ``nn.Linear`` holding its decoded weight, in place."""
    for name, layer in lowbit_layers(model).items():
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight.copy_(layer.effective_weight())
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
        dense.requires_grad_(False)
        model.set_submodule(name, dense.to(layer.codes.device))
    return model


def _distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over tokens, scaled by T^2 (Hinton et al.)."""
    vocab = student_logits.shape[-1]
    log_p = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2


def train_recovery(
    teacher: nn.Module, student: nn.Module, tokenizer: Any, config: RecoveryConfig = RecoveryConfig(),
    modules: list[str] | None = None, progress: bool = True,
) -> tuple[Recovery, dict[str, Any]]:
    """Train the recovery adapter of ``student`` (the quantized model, its linears dense or low-bit) towards
    ``teacher`` (the full-precision model); return it with a summary (KL before/after, seconds).

    ``modules``: the layers the adapter covers (default: every quantized layer, i.e. every ``LowBitLinear``; pass
    the names when ``student`` was densified). The student gets the adapter only while training: it is removed
    before returning, and the model is otherwise unchanged.
    """
    names = list(modules) if modules is not None else list(lowbit_layers(student))
    if not names:
        raise ConfigError("the student has no quantized layers to recover; load a quantized base into it first")
    batches = calibration_batches(tokenizer, config.source, sequences=config.sequences, length=config.length,
                                  batch_size=config.batch_size, seed=config.seed)
    device = next(student.parameters()).device
    # Targets are matched by module name (q_proj, ...); factors are kept for the quantized layers only.
    lora = LoraConfig(rank=config.rank, alpha=config.alpha, targets=sorted({n.rsplit(".", 1)[-1] for n in names}))
    torch.manual_seed(config.seed)
    inject_lora(student, lora, ADAPTER_NAME)
    set_active_adapters(student, [ADAPTER_NAME])
    params = adapter_parameters(student, ADAPTER_NAME)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = min(config.warmup_steps, config.steps // 2)  # a short run still reaches its peak rate
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, config.steps))
    teacher.eval()
    was_training = student.training
    student.train()
    losses: list[float] = []
    start = time.perf_counter()
    try:
        bar = tqdm(range(config.steps), desc="recovery adapter", disable=not progress, leave=False)
        for step in bar:
            batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
            with torch.no_grad():
                target = teacher(**batch).logits
            loss = _distillation_loss(student(**batch).logits, target, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
        factors = get_adapter_factors(student, ADAPTER_NAME)
    finally:
        student.train(was_training)
        delete_adapter(student, ADAPTER_NAME)
    recovery = Recovery(
        rank=config.rank, scaling=float(lora.scaling),
        factors={name: (a.cpu().numpy().astype(np.float16), b.cpu().numpy().astype(np.float16))
                 for name, (a, b) in factors.items() if name in names},
    )
    window = max(1, min(10, len(losses) // 4))
    summary = {"kl_first": float(np.mean(losses[:window])), "kl_last": float(np.mean(losses[-window:])),
               "seconds": round(time.perf_counter() - start, 1), "config": asdict(config)}
    return recovery, summary


def compress_recovery(recovery: Recovery, bits: float, plain_fingerprint: str) -> Recovery:
    """``recovery`` through the user adapters' codec (LowRA's per-channel codebooks and widths, ``bits`` effective
    bits per adapter parameter, the scaling folded in): the version-3 adapter, whose decoded factors are what the
    base computes with from then on. The blob binds to the plain base (``plain_fingerprint``)."""
    from lowra.sdk.quant.config import CompressConfig
    from lowra.sdk.workflow import compress_factors

    factors = {name: (torch.from_numpy(np.asarray(a, dtype=np.float32)), torch.from_numpy(np.asarray(b, dtype=np.float32)))
               for name, (a, b) in recovery.factors.items()}
    lora = LoraConfig(rank=recovery.rank, alpha=float(recovery.scaling) * recovery.rank)
    try:
        adapter = compress_factors(factors, lora, CompressConfig(bits=bits, weighted=False), adapter_id="recovery",
                                   base_fingerprint=plain_fingerprint)
    except BudgetError as exc:
        raise BudgetError(f"the recovery adapter cannot be stored at {bits:g} bits: {exc}. Raise --recovery-bits "
                          "(RecoveryConfig.bits) or keep float16 factors ('float16' / None)") from None
    return Recovery.from_blob(adapter.blob_bytes, {**recovery.info, "compressed_bits": float(bits)})


def recover_quantized_base(
    fp_model: nn.Module, tokenizer: Any, quantized: str | Path | QuantizedBase, out: str | Path,
    config: RecoveryConfig = RecoveryConfig(), overwrite: bool = False, progress: bool = True,
) -> QuantizedBase:
    """Train the recovery adapter of the plain quantized base ``quantized`` against ``fp_model`` (the model it was
    quantized from, e.g. ``load_base().model``, left unchanged) and write base + adapter to ``out`` (version 2).

    The new file is a different base (its fingerprint covers the adapter): adapters trained on the plain base do
    not load on it, and the other way round. Its ``recovery`` metadata names the plain base's fingerprint.
    """
    plain = quantized if isinstance(quantized, QuantizedBase) else read_quantized_base(Path(quantized))
    if plain.recovery is not None:
        raise ConfigError(
            f"{quantized if not isinstance(quantized, QuantizedBase) else 'the base'} already carries a recovery "
            f"adapter (trained from {plain.recovery.info.get('plain_fingerprint', 'an unknown base')}); pass the "
            "plain base `lowra quantize-base` wrote"
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--force) to replace it")
    student = copy.deepcopy(fp_model)
    load_quantized_base(student, plain)
    densify_lowbit(student)
    recovery, summary = train_recovery(fp_model, student, tokenizer, config, modules=list(plain.layers),
                                       progress=progress)
    del student
    recovery.info = {"plain_fingerprint": plain.fingerprint, "training": summary}
    if config.bits is not None:
        recovery = compress_recovery(recovery, config.bits, plain.fingerprint)
    recovered = QuantizedBase(
        layers=plain.layers, dense=plain.dense, fingerprint="",
        metadata={k: v for k, v in plain.metadata.items() if k != "created"},  # written now
        aliases=plain.aliases, recovery=recovery, codebook_format=plain.codebook_format,
    )
    recovered.write(out, overwrite=overwrite)
    return read_quantized_base(out)
