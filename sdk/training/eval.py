"""Held-out NLL: the one number every base (fp, quantized, + adapter) is compared by (issue 11's table).

Mean negative log-likelihood per *answer* token over the held-out sets of some user folders: the prompt is
rendered by :mod:`lowra.sdk.training.prompts` exactly as in training and generation, only the response tokens
(and the closing eos) are scored, and every model sees the same tokens, so two numbers are directly comparable.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from lowra.sdk.errors import DatasetError
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.data import IGNORE_INDEX, encode_example, load_user_dataset
from lowra.sdk.training.train import evaluate_loss

# The same cut as training: an answer longer than TrainConfig.max_len is scored up to it, for every model.
EVAL_MAX_LEN = TrainConfig.max_len
EVAL_BATCH_SIZE = 8


def sample_user_dirs() -> list[Path]:
    """The sample users shipped with lowra (``lowra.samples/users``), sorted by folder name."""
    from lowra.sdk.cli.demo_config import SAMPLE_USERS

    return sorted(p for p in SAMPLE_USERS.iterdir() if p.is_dir())


def heldout_nll(
    model: nn.Module,
    tokenizer: Any,
    users: Sequence[str | os.PathLike[str]] | None = None,
    max_len: int = EVAL_MAX_LEN,
    batch_size: int = EVAL_BATCH_SIZE,
) -> dict[str, Any]:
    """Mean NLL (nats) per answer token over the held-out examples of ``users`` (default: the sample users).

    Returns ``{"nll", "tokens", "users": {user_id: {"nll", "tokens"}}}``: the overall mean weights every answer
    token equally (a user with longer answers counts more), as the per-user means do within a user. Batched,
    without gradients, in eval mode (the model's mode is restored); the model is otherwise not touched.
    """
    folders = [Path(u) for u in users] if users is not None else sample_user_dirs()
    if not folders:
        raise DatasetError("heldout_nll needs at least one user folder (with a heldout.jsonl)")
    per_user: dict[str, dict[str, float | int]] = {}
    total, tokens = 0.0, 0
    for folder in folders:
        dataset = load_user_dataset(folder)
        if dataset.user_id in per_user:
            raise DatasetError(f"user {dataset.user_id!r} is listed twice ({folder}); pass each user folder once")
        # evaluate_loss shifts labels by one; the first label is always a prompt token, so the scored tokens are
        # exactly the labelled ones of each encoded example.
        count = sum(
            sum(1 for label in encode_example(tokenizer, ex, max_len)[1] if label != IGNORE_INDEX)
            for ex in dataset.heldout
        )
        nll = evaluate_loss(model, tokenizer, dataset.heldout, max_len=max_len, batch_size=batch_size)
        per_user[dataset.user_id] = {"nll": nll, "tokens": count}
        total += nll * count
        tokens += count
    return {"nll": total / max(tokens, 1), "tokens": tokens, "users": per_user}
