"""Training, evaluating, saving and loading LoRA adapters.

Saved adapters are plain PEFT folders (``adapter_config.json`` +
``adapter_model.safetensors``) so ``peft.PeftModel.from_pretrained`` loads them
unchanged; lowra adds ``lowra_input_stats.safetensors`` beside them for
activation-weighted compression.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lowra.sdk.training.data import IGNORE_INDEX, Example, UserDataset, collate, encode_example
from lowra.sdk.errors import AdapterFileError, ConfigError, DatasetError
from lowra.sdk.adapters.lora import (
    LoraConfig,
    adapter_names,
    adapter_parameters,
    adapter_scalings,
    get_adapter_factors,
    inject_lora,
    input_stats,
    lora_layers,
    recording_input_stats,
    set_active_adapters,
    set_stats_token_mask,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INPUT_STATS_FILE = "lowra_input_stats.safetensors"
PEFT_PREFIX = "base_model.model."
GRAD_CLIP = 1.0


@dataclass
class TrainConfig:
    steps: int = 60
    batch_size: int = 4
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_len: int = 160
    seed: int = 0
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if self.max_len < 2:
            raise ConfigError(f"TrainConfig.max_len must be >= 2, got {self.max_len}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ConfigError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass
class TrainResult:
    adapter_name: str
    losses: list[float]
    seconds: float
    input_stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class AdapterFiles:
    lora: LoraConfig
    factors: dict[str, tuple[Tensor, Tensor]]
    input_stats: dict[str, Tensor] | None
    config: dict[str, Any]


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return int(pad)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    # Linear warmup that reaches the full rate on the last warmup step, then a
    # cosine decay that stays above zero so the final step still learns.
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _response_loss_sum(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Summed cross-entropy over labelled (response) tokens and how many there were."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((shift_labels != IGNORE_INDEX).sum())


def train_adapter(
    model: nn.Module,
    tokenizer: Any,
    dataset: UserDataset,
    lora: LoraConfig,
    config: TrainConfig,
    adapter_name: str = "default",
    progress: bool = True,
) -> TrainResult:
    """Train one LoRA adapter on ``dataset.train``; only that adapter's tensors change.

    Deterministic for a given seed and data. The adapter is injected if the
    model does not have it yet and is left active afterwards.
    """
    if not dataset.train:
        raise DatasetError(f"dataset {dataset.user_id!r} has no training examples")
    torch.manual_seed(config.seed)
    if adapter_name not in adapter_names(model):
        inject_lora(model, lora, adapter_name)
    set_active_adapters(model, [adapter_name])
    params = adapter_parameters(model, adapter_name)
    for p in params:
        p.requires_grad_(True)
    device = _model_device(model)
    pad_id = _pad_id(tokenizer)
    encoded = [encode_example(tokenizer, ex, config.max_len) for ex in dataset.train]

    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.warmup_steps, config.steps)
    )
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []

    def next_batch() -> list[int]:
        # A stream of fresh permutations, so every example is seen once per epoch.
        while len(order) < config.batch_size:
            order.extend(torch.randperm(len(encoded), generator=generator).tolist())
        picked = order[: config.batch_size]
        del order[: config.batch_size]
        return picked

    losses: list[float] = []
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        with recording_input_stats(model):
            bar = tqdm(range(config.steps), desc=f"train {adapter_name}", disable=not progress, leave=False)
            for step in bar:
                batch = collate([encoded[i] for i in next_batch()], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                set_stats_token_mask(model, batch["attention_mask"])
                loss_sum, count = _response_loss_sum(model, batch)
                loss = loss_sum / max(count, 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                lr = schedule.get_last_lr()[0]
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
            stats = {
                path: value
                for path, value in input_stats(model).items()
                if adapter_name in lora_layers(model)[path].lora_A
            }
    finally:
        model.train(was_training)
    return TrainResult(
        adapter_name=adapter_name, losses=losses, seconds=time.perf_counter() - start, input_stats=stats
    )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_len: int = 160, batch_size: int = 8
) -> float:
    """Token-weighted mean cross-entropy over response tokens of ``examples``."""
    if not examples:
        raise DatasetError("evaluate_loss needs at least one example")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    pad_id = _pad_id(tokenizer)
    encoded = [encode_example(tokenizer, ex, max_len) for ex in examples]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i : i + batch_size], pad_id).items()}
            loss_sum, n = _response_loss_sum(model, batch)
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


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


def _write_atomically(out_dir: Path, overwrite: bool, write: Any) -> None:
    """Run ``write(tmp_dir)`` then move the finished folder to ``out_dir`` in one rename."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AdapterFileError(f"{out_dir} exists and is not a folder; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise AdapterFileError(
            f"{out_dir} already exists and is not empty; pass overwrite=True to replace it or choose another path"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    old = out_dir.parent / f".{out_dir.name}.old-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        if out_dir.exists():
            # Move the old folder aside first so out_dir is always either the
            # complete old adapter or the complete new one.
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


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

    _write_atomically(out, overwrite, write)
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
