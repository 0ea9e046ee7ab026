"""User datasets: loading, validating and encoding prompt/response pairs.

A user folder holds ``train.jsonl`` and ``heldout.jsonl`` (one
``{"prompt": str, "response": str}`` object per line) and an optional
``user.json`` card describing where the data came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from lowra.sdk.errors import DatasetError
from lowra.sdk.training.prompts import prompt_ids as render_prompt_ids

MIN_TRAIN_EXAMPLES = 8
MIN_HELDOUT_EXAMPLES = 2
IGNORE_INDEX = -100


@dataclass
class Example:
    prompt: str
    response: str


@dataclass
class UserDataset:
    user_id: str
    train: list[Example]
    heldout: list[Example]
    card: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def jsonl_objects(path: Path, each_line: str = "fix or remove that line") -> Iterator[tuple[int, Any]]:
    """``(line number, decoded value)`` for each non-blank line of a JSON Lines file; an invalid line is a
    DatasetError naming the file and line (``each_line`` says what a line should be)."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc.msg}); {each_line}") from None


def _read_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise DatasetError(
            f"missing {path.name} in {path.parent}; expected a JSON Lines file with one "
            '{"prompt": ..., "response": ...} object per line'
        )
    examples: list[Example] = []
    for lineno, obj in jsonl_objects(path):
        if not isinstance(obj, dict):
            raise DatasetError(
                f"{path}:{lineno}: expected a JSON object with 'prompt' and 'response', "
                f"got {type(obj).__name__}"
            )
        for key in ("prompt", "response"):
            if key not in obj:
                raise DatasetError(f"{path}:{lineno}: missing key {key!r}; each line needs 'prompt' and 'response'")
            value = obj[key]
            if not isinstance(value, str):
                raise DatasetError(f"{path}:{lineno}: {key!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DatasetError(f"{path}:{lineno}: {key!r} is empty; every example needs text in both fields")
        examples.append(Example(prompt=obj["prompt"], response=obj["response"]))
    return examples


def load_user_dataset(path: str | os.PathLike[str]) -> UserDataset:
    """Load and validate one user folder; raises DatasetError saying what to fix."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"user dataset folder {str(root)!r} does not exist; expected a folder with train.jsonl, "
            "heldout.jsonl and optionally user.json"
        )
    card: dict[str, Any] = {}
    card_path = root / "user.json"
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{card_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(card, dict):
            raise DatasetError(f"{card_path}: expected a JSON object, got {type(card).__name__}")
    train = _read_jsonl(root / "train.jsonl")
    heldout = _read_jsonl(root / "heldout.jsonl")
    if len(train) < MIN_TRAIN_EXAMPLES:
        raise DatasetError(
            f"{root / 'train.jsonl'} has {len(train)} examples; at least {MIN_TRAIN_EXAMPLES} are needed to train"
        )
    if len(heldout) < MIN_HELDOUT_EXAMPLES:
        raise DatasetError(
            f"{root / 'heldout.jsonl'} has {len(heldout)} examples; at least {MIN_HELDOUT_EXAMPLES} are needed "
            "to evaluate"
        )
    user_id = card.get("id") if isinstance(card.get("id"), str) and card.get("id") else root.name
    return UserDataset(user_id=str(user_id), train=train, heldout=heldout, card=card, path=root)


def encode_example(tokenizer: Any, example: Example, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for one example; only response tokens are labelled.

    The response is tokenized on its own and followed by the end-of-turn (eos)
    token, which is exactly the sequence the model must generate at inference.
    """
    if max_len < 2:
        raise DatasetError(f"max_len must be >= 2, got {max_len}")
    prompt_ids = render_prompt_ids(tokenizer, example.prompt)
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None:
        response_ids.append(int(eos))
    if len(prompt_ids) >= max_len:
        preview = example.prompt[:60] + ("..." if len(example.prompt) > 60 else "")
        raise DatasetError(
            f"prompt {preview!r} is {len(prompt_ids)} tokens with the chat template, leaving no room for the "
            f"response within max_len={max_len}; shorten the prompt or raise max_len"
        )
    input_ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_len]
    return input_ids, labels


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch of (input_ids, labels) into tensors; padding is masked and unlabelled."""
    if not batch:
        raise DatasetError("cannot collate an empty batch")
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        attention[row, :n] = 1
        labels[row, :n] = torch.tensor(labs, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
