"""Calibration text for quantization: fixed-length token windows, the same ones on every run (seeded).

The default set mixes the two kinds of text lowra's base must stay good at: the sample users' *train* examples
(rendered with the one prompt template, as in training) and CPython's ``pydoc_data.topics`` (general technical
prose). Held-out files are never read, so a base calibrated here is evaluated on text it has not seen. A folder
of the user's own ``.txt`` / ``.jsonl`` files can replace it (``heldout.jsonl`` files there are skipped too).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lowra.sdk.errors import DatasetError
from lowra.sdk.training.data import Example, encode_example, jsonl_objects, load_user_dataset

DEFAULT_SOURCE = "default"
# 128 windows of 64 tokens (8,192 tokens): E[x^2] per input settles well before that (measured on SmolLM2: see
# bench/bench_base_ppl.py), and a forward pass over them costs ~40 s on one busy core, the budget of
# `lowra quantize-base`. Windows are shorter than a typical prompt + answer, so sequence starts (where attention
# sinks put their large activations) are somewhat over-represented; the same holds for every model compared.
CALIBRATION_SEQUENCES = 128
CALIBRATION_LENGTH = 64
CALIBRATION_BATCH = 8
CALIBRATION_SEED = 0
# Heldout files are evaluation data wherever they are found.
HELDOUT_FILE = "heldout.jsonl"


def _user_documents(tokenizer: Any, users: Sequence[Path]) -> list[list[int]]:
    docs = []
    for folder in users:
        for example in load_user_dataset(folder).train:
            docs.append(_example_ids(tokenizer, example))
    return docs


def _example_ids(tokenizer: Any, example: Example) -> list[int]:
    # The whole example as training sees it (prompt template + answer + eos), never truncated.
    return encode_example(tokenizer, example, max_len=1 << 30)[0]


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + ([int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else [])


def _pydoc_documents(tokenizer: Any) -> list[list[int]]:
    from pydoc_data.topics import topics

    return [_text_ids(tokenizer, topics[key]) for key in sorted(topics)]


def _folder_documents(tokenizer: Any, folder: Path) -> list[list[int]]:
    if not folder.is_dir():
        raise DatasetError(
            f"calibration folder {str(folder)!r} does not exist; pass 'default' or a folder of .txt / .jsonl files"
        )
    docs = []
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".txt" and path.is_file():
            docs.append(_text_ids(tokenizer, path.read_text(encoding="utf-8")))
        elif path.suffix == ".jsonl" and path.is_file() and path.name != HELDOUT_FILE:
            for lineno, obj in jsonl_objects(path):
                if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    docs.append(_text_ids(tokenizer, obj["text"]))
                elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
                    docs.append(_example_ids(tokenizer, Example(obj["prompt"], obj["response"])))
                else:
                    raise DatasetError(
                        f"{path}:{lineno}: expected a JSON object with 'text', or 'prompt' and 'response' strings"
                    )
    if not any(docs):
        raise DatasetError(f"calibration folder {folder} has no text: expected .txt files or .jsonl lines")
    return docs


def calibration_documents(
    tokenizer: Any, source: str | os.PathLike[str] = DEFAULT_SOURCE, users: Sequence[str | os.PathLike[str]] | None = None
) -> dict[str, list[list[int]]]:
    """Token ids of every calibration document, by pool: ``{"users", "pydoc"}`` for the default source (``users``:
    the user folders whose train files are read, default the sample users), ``{"folder"}`` for a folder."""
    if str(source) != DEFAULT_SOURCE:
        return {"folder": _folder_documents(tokenizer, Path(source))}
    from lowra.sdk.training.eval import sample_user_dirs

    folders = [Path(u) for u in users] if users is not None else sample_user_dirs()
    return {"users": _user_documents(tokenizer, folders), "pydoc": _pydoc_documents(tokenizer)}


def _windows(docs: list[list[int]], count: int, length: int, rng: np.random.Generator) -> list[list[int]]:
    """``count`` distinct windows of ``length`` tokens from the documents, shuffled and joined into one stream."""
    order = rng.permutation(len(docs))
    stream = [t for i in order for t in docs[i]]
    n = len(stream) // length
    if n == 0:
        return []
    picked = np.sort(rng.choice(n, size=min(count, n), replace=False))
    return [stream[i * length : (i + 1) * length] for i in picked]


def calibration_batches(
    tokenizer: Any,
    source: str | os.PathLike[str] = DEFAULT_SOURCE,
    sequences: int = CALIBRATION_SEQUENCES,
    length: int = CALIBRATION_LENGTH,
    batch_size: int = CALIBRATION_BATCH,
    seed: int = CALIBRATION_SEED,
    users: Sequence[str | os.PathLike[str]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``sequences`` windows of ``length`` tokens as model inputs (``input_ids``, ``attention_mask``), in batches.

    The pools of :func:`calibration_documents` share the windows equally (the default: half user examples, half
    pydoc); a pool with too little text gives what it has. Deterministic for a given seed, tokenizer and text.
    """
    if sequences < 1 or length < 2 or batch_size < 1:
        raise DatasetError(f"calibration needs sequences >= 1, length >= 2, batch_size >= 1; got {sequences}, "
                           f"{length}, {batch_size}")
    pools = calibration_documents(tokenizer, source, users)
    rng = np.random.default_rng(seed)
    windows: list[list[int]] = []
    for k, docs in enumerate(pools.values()):
        windows += _windows(docs, sequences // len(pools) + (k < sequences % len(pools)), length, rng)
    if not windows:
        raise DatasetError(f"the calibration text ({source}) is shorter than one window of {length} tokens")
    ids = torch.tensor(windows, dtype=torch.long)
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
        for i in range(0, len(ids), batch_size)
    ]
