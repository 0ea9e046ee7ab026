"""Training and evaluating LoRA adapters (saving and loading them: :mod:`lowra.sdk.adapters.peft_io`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.input_stats import input_stats, recording_input_stats, set_stats_token_mask
from lowra.sdk.adapters.model import adapter_names, adapter_parameters, inject_lora, lora_layers, set_active_adapters
from lowra.sdk.errors import ConfigError, DatasetError
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.data import IGNORE_INDEX, Example, UserDataset, collate, encode_example

GRAD_CLIP = 1.0


@dataclass
class TrainResult:
    adapter_name: str
    losses: list[float]
    seconds: float
    input_stats: dict[str, Tensor] = field(default_factory=dict)


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def padding_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return int(pad)


def lr_factor(step: int, warmup: int, total: int) -> float:
    # Linear warmup that reaches the full rate on the last warmup step, then a
    # cosine decay that stays above zero so the final step still learns.
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def answer_token_losses(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Cross-entropy (float32 ``[n]``) of every labelled answer token of ``batch``, and the row of each (``[n]``).

    Only the answer positions reach the output head: a hook on ``model.get_output_embeddings()`` gathers them
    from its input, so the head's matmul and the log-softmax run on ``n`` positions instead of rows x tokens (on
    SmolLM2 the head is a 49,152-wide matmul, about a fifth of a training step's work, and most tokens are
    prompt or padding). Whatever the model does after its head (soft-capping, scaling) still runs, on the gathered
    logits. A model that never calls that module, or reshapes its output, gets full logits gathered afterwards;
    the values are the same either way.
    """
    labels = batch["labels"][:, 1:]
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shape = batch["input_ids"].shape
    gathered = False

    def gather(module: nn.Module, args: tuple) -> tuple | None:
        nonlocal gathered
        hidden = args[0]
        if gathered or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(shape):
            return None
        gathered = True
        return (hidden[:, :-1][rows, cols], *args[1:])

    handle = head.register_forward_pre_hook(gather) if isinstance(head, nn.Module) else None
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        if handle is not None:
            handle.remove()
    if not (gathered and logits.dim() == 2 and logits.shape[0] == rows.numel()):
        logits = logits[:, :-1][rows, cols]
    return F.cross_entropy(logits.float(), labels[rows, cols], reduction="none"), rows


def _model_loss_sum(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    losses, _ = answer_token_losses(model, batch)
    return losses.sum(), int(losses.numel())


def batch_order(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """The example indices of each step: fresh seeded permutations back to back, so every example is seen once
    per epoch (the same stream for one user trained alone or among others)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order.extend(torch.randperm(n_examples, generator=generator).tolist())
        yield order[:batch_size]
        del order[:batch_size]


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
    device = model_device(model)
    pad_id = padding_id(tokenizer)
    encoded = [encode_example(tokenizer, ex, config.max_len) for ex in dataset.train]

    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps)
    )
    batches = batch_order(len(encoded), config.batch_size, config.seed)

    losses: list[float] = []
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        with recording_input_stats(model):
            bar = tqdm(range(config.steps), desc=f"train {adapter_name}", disable=not progress, leave=False)
            for step in bar:
                batch = collate([encoded[i] for i in next(batches)], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                set_stats_token_mask(model, batch["attention_mask"])
                loss_sum, count = _model_loss_sum(model, batch)
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
    device = model_device(model)
    pad_id = padding_id(tokenizer)
    encoded = [encode_example(tokenizer, ex, max_len) for ex in examples]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i : i + batch_size], pad_id).items()}
            loss_sum, n = _model_loss_sum(model, batch)
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)
