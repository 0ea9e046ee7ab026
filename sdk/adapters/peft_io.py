"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ lowra's input statistics).

Saved adapters are plain PEFT folders so ``peft.PeftModel.from_pretrained`` loads them unchanged; lowra adds
``lowra_input_stats.safetensors`` beside them for activation-weighted compression. Folders are written through
:func:`lowra.device_runtime._files.atomic_dir`: the output is always the complete old or the complete new adapter.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lowra.device_runtime._files import atomic_dir
from lowra.device_runtime.errors import OutputExistsError
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.model import adapter_scalings, get_adapter_factors
from lowra.sdk.errors import AdapterFileError, ConfigError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "INPUT_STATS_FILE",
    "PEFT_PREFIX",
    "AdapterFiles",
    "load_adapter",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INPUT_STATS_FILE = "lowra_input_stats.safetensors"
# PEFT's key prefix: its LoraModel wraps the base model as ``base_model.model``.
PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterFiles:
    """What an adapter folder holds: its LoRA config, float32 factors per module, optional input statistics."""

    lora: LoraConfig
    factors: dict[str, tuple[Tensor, Tensor]]
    input_stats: dict[str, Tensor] | None
    config: dict[str, Any]


def _short_names(paths: Sequence[str]) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def _peft_config(lora: LoraConfig, target_modules: list[str], base_name_or_path: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name_or_path or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def save_adapter(
    model: nn.Module,
    adapter_name: str,
    out_dir: str | os.PathLike[str],
    lora: LoraConfig,
    input_stats: dict[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    base_name_or_path: str = "",
    overwrite: bool = False,
) -> Path:
    """Write adapter ``adapter_name`` as a PEFT-compatible folder, atomically."""
    out = Path(out_dir).expanduser()
    factors = get_adapter_factors(model, adapter_name)
    scalings = adapter_scalings(model, adapter_name)
    for path, (a, _) in factors.items():
        # PEFT derives every module's scaling from one r and lora_alpha.
        if a.shape[0] != lora.rank or not math.isclose(scalings[path], lora.scaling, rel_tol=1e-9):
            raise ConfigError(
                f"module {path!r} has rank {a.shape[0]} and scaling {scalings[path]}, but the LoraConfig says "
                f"rank {lora.rank} and scaling {lora.scaling}; pass the LoraConfig the adapter was built with"
            )
    tensors: dict[str, Tensor] = {}
    for path, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.to(device="cpu", dtype=dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.to(device="cpu", dtype=dtype).contiguous()
    stats: dict[str, Tensor] | None = None
    if input_stats is not None:
        stats = {}
        for path, value in input_stats.items():
            if path not in factors:
                continue
            want = factors[path][0].shape[1]
            if value.shape != (want,):
                raise ConfigError(f"input_stats[{path!r}] has shape {tuple(value.shape)}, expected ({want},)")
            stats[path] = value.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    config = _peft_config(lora, _short_names(list(factors)), base_name_or_path)

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if stats is not None:
            save_file(stats, str(tmp / INPUT_STATS_FILE), metadata={"format": "pt"})

    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write(tmp)
    except OutputExistsError as exc:
        raise AdapterFileError(str(exc)) from None
    return out


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({exc}); re-save the adapter") from None


def load_adapter(path: str | os.PathLike[str]) -> AdapterFiles:
    """Read a PEFT LoRA folder (as written by ``save_adapter`` or peft) into float32 factors."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise AdapterFileError(f"adapter folder {str(root)!r} does not exist; expected a folder from save_adapter")
    cfg_path = root / ADAPTER_CONFIG
    weights_path = root / ADAPTER_WEIGHTS
    for needed in (cfg_path, weights_path):
        if not needed.is_file():
            raise AdapterFileError(
                f"missing {needed.name} in {root}; an adapter folder needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
            )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{cfg_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{cfg_path} is not a LoRA adapter config (peft_type must be 'LORA')")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora") or config.get("use_dora"):
        raise AdapterFileError(
            f"{cfg_path} uses rank_pattern/alpha_pattern/rslora/DoRA, which lowra does not support; "
            "re-train with a plain LoRA config"
        )
    try:
        lora = LoraConfig(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            targets=config["target_modules"],
            dropout=float(config.get("lora_dropout", 0.0)),
        )
    except KeyError as exc:
        raise AdapterFileError(f"{cfg_path} is missing key {exc.args[0]!r}") from None
    except ConfigError as exc:
        raise AdapterFileError(f"{cfg_path} holds an invalid LoRA config: {exc}") from None

    halves: dict[str, dict[str, Tensor]] = {}
    for key, tensor in _read_safetensors(weights_path).items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.startswith(PEFT_PREFIX) and key.endswith(suffix):
                halves.setdefault(key[len(PEFT_PREFIX) : -len(suffix)], {})[part] = tensor
                break
        else:
            raise AdapterFileError(
                f"{weights_path} has unexpected tensor {key!r}; expected "
                f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' keys only"
            )
    if not halves:
        raise AdapterFileError(f"{weights_path} holds no LoRA tensors")
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for module, pair in halves.items():
        missing = [p for p in ("lora_A", "lora_B") if p not in pair]
        if missing:
            raise AdapterFileError(f"{weights_path}: module {module!r} has no {missing[0]} tensor; the file is incomplete")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != lora.rank or b.shape[1] != lora.rank:
            raise AdapterFileError(
                f"{weights_path}: module {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; expected "
                f"A [{lora.rank}, in] and B [out, {lora.rank}] for r={lora.rank}"
            )
        factors[module] = (a.float(), b.float())

    stats: dict[str, Tensor] | None = None
    stats_path = root / INPUT_STATS_FILE
    if stats_path.is_file():
        stats = {}
        for module, value in _read_safetensors(stats_path).items():
            if module not in factors:
                raise AdapterFileError(f"{stats_path}: statistics for {module!r}, which has no LoRA factors")
            want = factors[module][0].shape[1]
            if tuple(value.shape) != (want,):
                raise AdapterFileError(
                    f"{stats_path}: statistics for {module!r} have shape {tuple(value.shape)}, expected ({want},)"
                )
            stats[module] = value.float()
    return AdapterFiles(lora=lora, factors=factors, input_stats=stats, config=config)
