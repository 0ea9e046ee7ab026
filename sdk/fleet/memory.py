"""How much memory a fleet worker needs, so the driver never starts more workers (or bigger batches) than fit.

A worker holds the base once plus, while it trains a batch of K users, the activations autograd saves for the
backward pass: every decoder layer keeps a few hidden-wide and intermediate-wide vectors per token of every user's
micro-batch. That term dominates. Measured on SmolLM2-135M (batch 4, max_len 160): one ``train_users`` step peaks at
1.84 / 3.42 / 5.85 GB RSS at K = 1 / 2 / 4 (1.36-1.50 GB per user), and a Ray fleet worker at K = 4 that has run
several batches (training, compression, evaluation, allocator slack) holds 7.5-7.7 GiB; the fp32 base is 0.43 GB.
Two such workers beside a driver that also held a model did not fit in 24 GB, and Ray's memory monitor killed one
mid-batch; this module turns that into a plan made before any worker starts.

The estimate is per token and layer, ``ACTIVATION_FLOATS_HIDDEN x hidden + ACTIVATION_FLOATS_INTERMEDIATE x
intermediate`` float32 values, times every token a batch can hold (``batch_size x max_len``, the padded worst case),
fitted to the long-running worker above (7.8 GiB predicted at K = 4): an upper bound for one step, and for shorter
examples. Torch-free: the driver plans from the model's ``config.json`` without loading weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lowra.sdk.errors import ConfigError

ACTIVATION_FLOATS_HIDDEN = 18  # per token and layer: norms, q/k/v/o, residuals, LoRA inputs (hidden-wide)
ACTIVATION_FLOATS_INTERMEDIATE = 9  # gate, up, activation, product, their LoRA paths (intermediate-wide)
WORKER_OVERHEAD_BYTES = 400 * 2**20  # interpreter, torch, tokenizer: measured ~0.35-0.45 GB
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a causal LM's config.json."""

    layers: int
    hidden: int
    intermediate: int
    parameters: int  # every parameter, for the base's own float32 bytes

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        try:
            layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
            intermediate = int(config.get("intermediate_size", 4 * hidden))
            vocab = int(config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config.json lacks {exc} (expected num_hidden_layers, hidden_size, vocab_size)") from None
        heads = int(config.get("num_attention_heads", 1)) or 1
        kv = int(config.get("num_key_value_heads", heads)) or heads
        kv_width = hidden // heads * kv
        per_layer = hidden * (2 * hidden + 2 * kv_width) + 3 * hidden * intermediate + 2 * hidden
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
        return cls(layers, hidden, intermediate, layers * per_layer + embeddings + hidden)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> ModelShape:
        path = Path(folder) / "config.json"
        try:
            return cls.from_config(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read the base's config {path}: {exc}") from None


def activation_bytes(shape: ModelShape, tokens: int) -> int:
    """Bytes autograd keeps for the backward pass of one training step over ``tokens`` tokens (padding included)."""
    floats = ACTIVATION_FLOATS_HIDDEN * shape.hidden + ACTIVATION_FLOATS_INTERMEDIATE * shape.intermediate
    return tokens * shape.layers * floats * 4


def training_bytes_per_user(shape: ModelShape, batch_size: int, max_len: int) -> int:
    """Activation bytes one user's micro-batch adds to a training step (upper bound: every example at max_len)."""
    return activation_bytes(shape, batch_size * max_len)


def worker_bytes(shape: ModelShape, batch_users: int, batch_size: int, max_len: int) -> int:
    """Peak bytes of one fleet worker: the fp32 base, its overhead, and K users' activations."""
    return (4 * shape.parameters + WORKER_OVERHEAD_BYTES
            + batch_users * training_bytes_per_user(shape, batch_size, max_len))


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process could still allocate: MemAvailable, capped by a cgroup v2 ``memory.max`` (minus what the
    cgroup already uses); None where neither can be read (not Linux)."""
    limits: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cap = (cgroup_root / "memory.max").read_text().strip()
        if cap.isdigit():
            used = int((cgroup_root / "memory.current").read_text().strip())
            limits.append(max(0, int(cap) - used))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def fit_workers(wanted: int, need: int, node_memory: list[int], *, batch_users: int, per_user: int) -> int:
    """How many of ``wanted`` workers of ``need`` bytes fit on nodes with ``node_memory`` bytes each (Ray's
    schedulable ``memory``, which already leaves ~30% of a node to the object store and the system). Refuses, naming
    the numbers and what to change, when not even one fits."""
    fits = sum(free // need for free in node_memory)
    if fits >= 1:
        return min(wanted, fits)
    largest = max(node_memory, default=0)
    spare = largest - (need - batch_users * per_user)
    max_k = int(spare // per_user) if per_user else 0
    hint = (f"use --batch-users {max_k}" if max_k >= 1
            else "lower the training batch size or --max-len, or use a machine with more memory")
    raise ConfigError(
        f"one fleet worker training {batch_users} users at once needs ~{need / GIB:.1f} GiB "
        f"({per_user / GIB:.2f} GiB of activations per user), but the most any node has available is "
        f"{largest / GIB:.1f} GiB; {hint}")
