"""Held-out NLL (the one comparison number) and the calibration set quantization records its statistics on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from lowra.sdk.errors import DatasetError
from lowra.sdk.training.calibration import calibration_batches, calibration_documents
from lowra.sdk.training.data import encode_example, load_user_dataset
from lowra.sdk.training.eval import heldout_nll, sample_user_dirs


def write_user(root: Path, name: str, train: list[tuple[str, str]], heldout: list[tuple[str, str]]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for file, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (folder / file).write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    return folder


@pytest.fixture
def users(tmp_path: Path) -> list[Path]:
    train = [(f"Tell me about item {i}.", f"Item {i} is a small red box.") for i in range(10)]
    return [
        write_user(tmp_path, "alice", train, [("What is the fox?", "A quick brown fox."), ("Why?", "Because.")]),
        write_user(tmp_path, "bob", train[::-1], [("Say hello", "hello thanks sure"), ("Food?", "I love pizza.")]),
    ]


def test_heldout_nll_is_the_mean_answer_token_nll(tiny_model, tiny_tokenizer, users):
    """Hand-computed: one example at a time, -log p(answer token | everything before), answer tokens only."""
    total, count, per_user = 0.0, 0, {}
    for folder in users:
        user_total, user_count = 0.0, 0
        for ex in load_user_dataset(folder).heldout:
            ids, labels = encode_example(tiny_tokenizer, ex, 160)
            with torch.no_grad():
                logp = F.log_softmax(tiny_model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    user_total -= float(logp[t - 1, ids[t]])
                    user_count += 1
        per_user[folder.name] = user_total / user_count
        total, count = total + user_total, count + user_count
    result = heldout_nll(tiny_model, tiny_tokenizer, users, batch_size=3)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    for name, nll in per_user.items():
        assert result["users"][name]["nll"] == pytest.approx(nll, rel=1e-5)
    assert tiny_model.training is False


def test_heldout_nll_defaults_to_the_sample_users_and_refuses_duplicates(users, tiny_model, tiny_tokenizer):
    assert [p.name for p in sample_user_dirs()] == ["json_reply", "python_help", "terse_notes"]
    with pytest.raises(DatasetError, match="listed twice"):
        heldout_nll(tiny_model, tiny_tokenizer, [users[0], users[0]])


def test_calibration_is_deterministic_fixed_length_and_never_reads_heldout(tiny_tokenizer, users):
    make = lambda seed=0: calibration_batches(tiny_tokenizer, users=users, sequences=12, length=8, batch_size=5,  # noqa: E731
                                              seed=seed)
    first, again = make(), make()
    assert [b["input_ids"].shape for b in first] == [(5, 8), (5, 8), (2, 8)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert all(bool(b["attention_mask"].all()) for b in first)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, make(seed=1)))
    pools = calibration_documents(tiny_tokenizer, users=users)
    assert set(pools) == {"users", "pydoc"} and len(pools["pydoc"]) > 50
    train = {tuple(encode_example(tiny_tokenizer, ex, 1 << 30)[0]) for u in users for ex in load_user_dataset(u).train}
    heldout = {tuple(encode_example(tiny_tokenizer, ex, 1 << 30)[0]) for u in users
               for ex in load_user_dataset(u).heldout}
    docs = {tuple(d) for d in pools["users"]}
    assert docs == train and not docs & heldout


def test_calibration_folder_reads_text_and_examples_but_skips_heldout(tiny_tokenizer, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "notes.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    (folder / "chat.jsonl").write_text(json.dumps({"prompt": "hello", "response": "thanks sure"}) + "\n"
                                       + json.dumps({"text": "of course"}) + "\n")
    (folder / "heldout.jsonl").write_text("not json at all\n")  # never read
    docs = calibration_documents(tiny_tokenizer, folder)
    assert set(docs) == {"folder"} and len(docs["folder"]) == 3
    batches = calibration_batches(tiny_tokenizer, folder, sequences=4, length=16)
    assert batches[0]["input_ids"].shape == (4, 16)
    (folder / "bad.jsonl").write_text(json.dumps({"prompt": "only a prompt"}) + "\n")
    with pytest.raises(DatasetError, match="bad.jsonl:1: expected a JSON object with 'text'"):
        calibration_documents(tiny_tokenizer, folder)
    with pytest.raises(DatasetError, match="does not exist"):
        calibration_documents(tiny_tokenizer, tmp_path / "missing")
