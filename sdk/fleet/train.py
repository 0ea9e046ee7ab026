"""Batched multi-user training: K users' LoRA adapters trained in one process, sharing every step on one frozen base.

Each step runs the base once over every user's batch (rows grouped user after user, see
:mod:`lowra.sdk.fleet.batched`), so K users cost one forward and one backward of the base instead of K. Everything
that makes a user's result its own stays per user, exactly as :func:`~lowra.sdk.training.train.train_adapter`
does it: the seed of the factors' initialisation, the seed-driven batch order, the loss (mean over its own answer
tokens), the gradient clipping, the AdamW state and the learning-rate schedule. A user's rows never meet another
user's factors, so its factors match those of ``train_adapter`` on the same data and seed up to float rounding,
whoever shares its batches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.layer import check_adapter_name
from lowra.sdk.adapters.model import adapter_names, adapter_parameters, inject_lora, lora_layers, set_active_adapters
from lowra.sdk.errors import ConfigError, DatasetError
from lowra.sdk.fleet.batched import RowGroups, grouped_lora
from lowra.sdk.fleet.memory import GIB, ModelShape, activation_bytes, available_memory
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.data import UserDataset, collate, encode_example
from lowra.sdk.training.train import (
    GRAD_CLIP,
    TrainResult,
    answer_token_losses,
    batch_order,
    lr_factor,
    model_device,
    padding_id,
)

__all__ = ["train_users"]


@dataclass
class _UserRun:
    """One user's own training state inside the shared loop."""

    user_id: str
    config: TrainConfig
    encoded: list[tuple[list[int], list[int]]]
    batches: Iterator[list[int]] = field(init=False)
    params: list[nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    schedule: torch.optim.lr_scheduler.LambdaLR | None = None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.batches = batch_order(len(self.encoded), self.config.batch_size, self.config.seed)

    def start(self, model: nn.Module) -> None:
        self.params = adapter_parameters(model, self.user_id)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        warmup, total = self.config.warmup_steps, self.config.steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, total))

    def step(self, loss: Tensor) -> None:
        """Clip this user's gradient on its own, then its own optimizer and schedule step."""
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.schedule.step()
        self.losses.append(float(loss.detach()))


def _configs_by_user(users: Sequence[str], config: TrainConfig | Mapping[str, TrainConfig]) -> dict[str, TrainConfig]:
    if isinstance(config, TrainConfig):
        return {u: config for u in users}
    missing = [u for u in users if u not in config]
    if missing:
        raise ConfigError(f"no TrainConfig for users {missing}; pass one TrainConfig or one per user id")
    bad = [u for u in users if not isinstance(config[u], TrainConfig)]
    if bad:
        raise ConfigError(f"config for users {bad} is not a TrainConfig")
    return {u: config[u] for u in users}


def _check_users(model: nn.Module, datasets: Sequence[UserDataset], lora: LoraConfig) -> None:
    """Everything that can be refused is refused before the model changes."""
    if not datasets:
        raise DatasetError("train_users needs at least one user dataset")
    if lora.dropout > 0:
        raise ConfigError(
            f"batched training needs LoraConfig.dropout == 0, got {lora.dropout}: dropout masks would come from "
            "one random stream shared by every user in the batch, so a user's adapter would depend on who shared "
            "its steps. Train with dropout=0, or train this user alone with train_adapter"
        )
    seen: set[str] = set()
    existing = set(adapter_names(model))
    for dataset in datasets:
        uid = dataset.user_id
        if uid in seen:
            raise DatasetError(f"user id {uid!r} appears twice; every user of a batch needs its own id")
        seen.add(uid)
        check_adapter_name(uid)
        if uid in existing:
            raise ConfigError(
                f"the model already holds an adapter named {uid!r}; delete_adapter() it before training that user"
            )
        if not dataset.train:
            raise DatasetError(f"dataset {uid!r} has no training examples")


def _user_losses(model: nn.Module, batch: dict[str, Tensor], counts: Sequence[int]) -> list[Tensor]:
    """Each user's mean cross-entropy over its own answer tokens (its ``counts[i]`` rows, in order).

    One loss per token over the whole batch, then summed per user: slicing the logits per user instead costs a
    zero-filled logits-sized gradient per user in the backward pass."""
    losses, rows = answer_token_losses(model, batch)
    user_of_row = torch.repeat_interleave(torch.arange(len(counts), device=rows.device),
                                          torch.tensor(counts, device=rows.device))
    users = user_of_row[rows]
    sums = losses.new_zeros(len(counts)).index_add(0, users, losses)
    n = torch.bincount(users, minlength=len(counts)).clamp_min(1)
    return list((sums / n).unbind())


def _check_memory(model: nn.Module, runs: list[_UserRun], device: torch.device) -> None:
    """Refuse, before allocating anything, a batch of users whose step cannot fit in this machine's free memory
    (an out-of-memory kill would take the whole process, and every other user of the batch, with it)."""
    config = getattr(model, "config", None)
    free = available_memory() if device.type == "cpu" else None
    if free is None or config is None or not hasattr(config, "to_dict"):
        return
    try:
        shape = ModelShape.from_config(config.to_dict())
    except ConfigError:
        return  # not a config this estimate knows: train unplanned
    longest = max((len(ids) for run in runs for ids, _ in run.encoded), default=0)
    rows = sum(min(run.config.batch_size, len(run.encoded)) for run in runs)
    need = activation_bytes(shape, rows * longest)
    if need > free:
        per_user = need / max(1, len(runs))
        raise ConfigError(
            f"training {len(runs)} users at once needs ~{need / GIB:.1f} GiB of activations per step "
            f"({rows} rows x {longest} tokens), but only {free / GIB:.1f} GiB of memory is available; train at most "
            f"{max(1, int(free // per_user))} users at once (--batch-users), or lower --max-len / the batch size")


def train_users(
    model: nn.Module,
    tokenizer: Any,
    datasets: Sequence[UserDataset],
    lora: LoraConfig,
    config: TrainConfig | Mapping[str, TrainConfig],
    progress: bool = True,
) -> dict[str, TrainResult]:
    """Train one LoRA adapter per user, named by its user id, all users sharing every step of one frozen base.

    ``config`` is one :class:`TrainConfig` for everyone or one per user id (own seed, batch size, steps,
    learning rate, warmup); a user whose steps are done leaves the batch. Each result is what
    ``train_adapter`` returns for that user: its losses, its input statistics, and ``seconds`` from the start
    of the shared run to its last step. The adapters stay in the model (``get_adapter_factors(model, user_id)``,
    ``save_adapter``, ``delete_adapter``); the adapters active before the call are active again afterwards.
    The base (``nn.Linear`` or ``LowBitLinear`` linears) is never changed.
    """
    _check_users(model, datasets, lora)
    configs = _configs_by_user([d.user_id for d in datasets], config)
    runs = [
        _UserRun(d.user_id, configs[d.user_id], [encode_example(tokenizer, ex, configs[d.user_id].max_len)
                                                  for ex in d.train])
        for d in datasets
    ]
    device = model_device(model)
    _check_memory(model, runs, device)
    pad_id = padding_id(tokenizer)
    layers = lora_layers(model)
    was_active = list(next(iter(layers.values())).active) if layers else []
    for run in runs:
        # train_adapter's order: seed, then inject, so the factors start from the same draw.
        torch.manual_seed(run.config.seed)
        inject_lora(model, lora, run.user_id)
        run.start(model)
    # As in train_adapter, no other adapter is active while a user trains.
    set_active_adapters(model, None)

    was_training = model.training
    model.train()
    start = time.perf_counter()
    steps = max(run.config.steps for run in runs)
    try:
        with grouped_lora(model, [run.user_id for run in runs]) as group:
            group.record_input_stats(True)
            bar = tqdm(range(steps), desc=f"train {len(runs)} users", disable=not progress, leave=False)
            for step in bar:
                present = [run for run in runs if step < run.config.steps]
                rows = [run.encoded[i] for run in present for i in next(run.batches)]
                counts = [run.config.batch_size for run in present]
                batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
                group.route(RowGroups.build([run.user_id for run in present], counts, batch["attention_mask"]))
                losses = _user_losses(model, batch, counts)
                for run in present:
                    run.optimizer.zero_grad(set_to_none=True)
                # Each user's factors see only its own rows, so the sum's gradient is each user's own.
                torch.stack(losses).sum().backward()
                for run, loss in zip(present, losses):
                    run.step(loss)
                    if step + 1 == run.config.steps:
                        run.seconds = time.perf_counter() - start
                bar.set_postfix(mean_loss=f"{sum(r.losses[-1] for r in present) / len(present):.4f}")
            stats = {run.user_id: group.input_stats(run.user_id) for run in runs}
    finally:
        model.train(was_training)
        set_active_adapters(model, was_active)
    return {
        run.user_id: TrainResult(
            adapter_name=run.user_id, losses=run.losses, seconds=run.seconds, input_stats=stats[run.user_id]
        )
        for run in runs
    }
