"""lowra.sdk: quantize a base model, train per-user LoRA adapters on it, compress them into blobs.

The public API, for ``from lowra import sdk``::

    base = sdk.load_base()
    lora = sdk.LoraConfig(rank=16, alpha=32)
    result = sdk.train_adapter(base.model, base.tokenizer, sdk.load_user_dataset(path), lora, sdk.TrainConfig())
    factors = sdk.get_adapter_factors(base.model, "default")
    blob = sdk.compress_factors(factors, lora, sdk.CompressConfig(bits=1.0), adapter_id="alice",
                                base_fingerprint=sdk.model_fingerprint(base.model, list(factors)))

Names load on first use (PEP 562): ``import lowra.sdk`` and the configs import no torch, so the CLI's parser and
``lowra inspect`` stay fast; the first model-level name pulls torch in. Everything else lives in the subpackages
(``lowra.sdk.adapters``, ``.quant``, ``.training``) for callers that need the internals.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # base model
    "load_base": "lowra.sdk.base_model",
    "resolve_base": "lowra.sdk.base_model",
    "linear_module_names": "lowra.sdk.modules",
    # data and training
    "load_user_dataset": "lowra.sdk.training.data",
    "TrainConfig": "lowra.sdk.training.config",
    "train_adapter": "lowra.sdk.training.train",
    "evaluate_loss": "lowra.sdk.training.train",
    # adapters
    "LoraConfig": "lowra.sdk.adapters.config",
    "inject_lora": "lowra.sdk.adapters.model",
    "set_active_adapters": "lowra.sdk.adapters.model",
    "get_adapter_factors": "lowra.sdk.adapters.model",
    "set_adapter_factors": "lowra.sdk.adapters.model",
    "delete_adapter": "lowra.sdk.adapters.model",
    "save_adapter": "lowra.sdk.adapters.peft_io",
    "load_adapter": "lowra.sdk.adapters.peft_io",
    # adapter compression and binding to a base
    "CompressConfig": "lowra.sdk.quant.config",
    "compress_factors": "lowra.sdk.workflow",
    "model_fingerprint": "lowra.sdk.workflow",
    "apply_blob": "lowra.sdk.workflow",
    "generate_reply": "lowra.sdk.workflow",
    # low-bit base
    "QuantizeConfig": "lowra.sdk.quant.base.config",
    "quantize_model": "lowra.sdk.quant.base.apply",
    "record_input_stats": "lowra.sdk.quant.base.apply",
    "cached_quantized_base": "lowra.sdk.quant.base.cache",
    "load_quantized_base": "lowra.sdk.quant.lowbit_linear",
    "LowBitLinear": "lowra.sdk.quant.lowbit_linear",
    # errors
    "LowraError": "lowra.sdk.errors",
    "ConfigError": "lowra.sdk.errors",
    "BudgetError": "lowra.sdk.errors",
    "DatasetError": "lowra.sdk.errors",
    "AdapterFileError": "lowra.sdk.errors",
    "BaseModelNotFoundError": "lowra.sdk.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowra.sdk' has no attribute {name!r}; public names: {', '.join(__all__)}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
