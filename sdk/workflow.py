"""The steps the CLI, the demo and the benchmarks share: bind adapters to their base, compress a trained
adapter into a blob, put a blob (or device-merged weights) back into a torch model, generate text.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from lowra.device_runtime import formats as fmt
from lowra.device_runtime.runtime import BaseWeights
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.model import lora_layers, set_active_adapters, set_adapter_factors
from lowra.sdk.errors import ConfigError
from lowra.sdk.quant.adapter_compression import CompressedAdapter, compress_adapter
from lowra.sdk.quant.config import CompressConfig
from lowra.sdk.training.prompts import render_prompt


def frozen_weight(layer: nn.Module, name: str = "") -> torch.Tensor:
    """The float32 weight a frozen base layer computes with: ``weight`` of an ``nn.Linear``, the decode of a
    low-bit layer (it stores no fp weight; its identity is what it decodes to, the same float32 the device runtime
    decodes bit for bit, with a recovered base's recovery adapter added)."""
    if hasattr(layer, "effective_weight"):
        weight = layer.effective_weight()
    else:
        weight = layer.dequantize() if hasattr(layer, "dequantize") else getattr(layer, "weight", None)
    if weight is None:
        raise ConfigError(f"module {name or type(layer).__name__!r} has neither a weight nor a dequantize()")
    return weight.detach().to(torch.float32)


def model_fingerprint(model: nn.Module, module_names: list[str]) -> str:
    """Base fingerprint (see docs/FORMAT.md) of the frozen weights under ``module_names`` of a torch model."""
    layers = lora_layers(model)
    modules = dict(model.named_modules())
    digests, shapes = {}, {}
    for name in module_names:
        layer = layers[name].base if name in layers else modules.get(name)
        if layer is None:
            raise ConfigError(f"module {name!r} not found in the model")
        weight = frozen_weight(layer, name).to("cpu").contiguous().numpy()
        digests[name] = fmt.tensor_digest(weight)
        shapes[name] = tuple(weight.shape)
    return fmt.base_fingerprint(digests, shapes)


def base_dir_fingerprint(base_dir: str | Path, module_names: list[str]) -> str:
    """The same fingerprint computed from a base folder's safetensors (no torch model needed)."""
    return BaseWeights(base_dir).fingerprint(module_names)


def lora_metadata(lora: LoraConfig) -> dict[str, Any]:
    return {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets, "scaling": lora.scaling}


def compress_factors(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    lora: LoraConfig,
    config: CompressConfig,
    *,
    adapter_id: str,
    base_fingerprint: str,
    input_stats: Mapping[str, torch.Tensor] | None = None,
    card: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> CompressedAdapter:
    return compress_adapter(
        factors,
        lora.scaling,
        config,
        adapter_id=adapter_id,
        base_fingerprint=base_fingerprint,
        lora_meta=lora_metadata(lora),
        card=card,
        input_stats=input_stats,
        progress=progress,
    )


def apply_blob(model: nn.Module, blob: fmt.Blob, adapter_name: str) -> None:
    """Load a blob's decoded factors as LoRA adapter ``adapter_name`` (scaling 1: it is folded into up)."""
    factors = {}
    for m in blob.modules:
        up, down = blob.factors(m.name)
        factors[m.name] = (torch.from_numpy(down), torch.from_numpy(up))
    set_adapter_factors(model, adapter_name, factors, scaling=1.0)
    set_active_adapters(model, adapter_name)


def sdk_merged_weight(base_weight: torch.Tensor, blob: fmt.Blob, module: str) -> torch.Tensor:
    """What the sdk computes for a merged weight from a blob: ``W + up @ down`` in torch float32."""
    up, down = blob.factors(module)
    return base_weight.detach().to(torch.float32) + torch.from_numpy(up) @ torch.from_numpy(down)


@torch.no_grad()
def load_weights_into(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy device-merged weights (tensor name -> array) into a plain torch model, in place."""
    params = dict(model.named_parameters())
    for name, array in weights.items():
        if name not in params:
            raise ConfigError(f"weight {name!r} does not exist in the model")
        if tuple(params[name].shape) != tuple(array.shape):
            raise ConfigError(f"weight {name!r}: model has {tuple(params[name].shape)}, got {tuple(array.shape)}")
        with warnings.catch_warnings():
            # the runtime's arrays are read-only on purpose; copy_ only reads them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))


@torch.no_grad()
def generate_reply(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy reply to ``prompt`` as the user turn of the chat template (deterministic, for demos and tests)."""
    ids = tokenizer(render_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
