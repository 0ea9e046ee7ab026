from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lowra.sdk.training.data import (
    IGNORE_INDEX,
    MIN_HELDOUT_EXAMPLES,
    MIN_TRAIN_EXAMPLES,
    Example,
    collate,
    encode_example,
    load_user_dataset,
)
from lowra.sdk.errors import DatasetError


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_load_user_dataset(tiny_user_dir: Path) -> None:
    ds = load_user_dataset(tiny_user_dir)
    assert ds.user_id == "tiny-user"
    assert len(ds.train) == 16 and len(ds.heldout) == 4
    assert ds.train[0] == Example("Tell me about pizza.", "Sure! I love pizza. Thanks!")
    assert ds.card["license"] == "CC0-1.0"
    assert ds.path == tiny_user_dir


def test_user_id_falls_back_to_folder_name(tmp_path: Path, make_user_dir) -> None:
    root = make_user_dir(tmp_path / "bob-42", card=False)
    assert load_user_dataset(root).user_id == "bob-42"


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_user_dataset(tmp_path / "nobody")


def test_missing_file(tiny_user_dir: Path) -> None:
    (tiny_user_dir / "heldout.jsonl").unlink()
    with pytest.raises(DatasetError, match="missing heldout.jsonl"):
        load_user_dataset(tiny_user_dir)


def test_bad_json_reports_file_and_line(tiny_user_dir: Path) -> None:
    lines = (tiny_user_dir / "train.jsonl").read_text().splitlines()
    lines[4] = '{"prompt": "oops", "response": '
    _write_lines(tiny_user_dir / "train.jsonl", lines)
    with pytest.raises(DatasetError) as err:
        load_user_dataset(tiny_user_dir)
    assert "train.jsonl:5" in str(err.value) and "invalid JSON" in str(err.value)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "hi"}, "missing key 'response'"),
        ({"response": "hi"}, "missing key 'prompt'"),
        ({"prompt": "hi", "response": ""}, "'response' is empty"),
        ({"prompt": "   ", "response": "x"}, "'prompt' is empty"),
        ({"prompt": 3, "response": "x"}, "must be a string"),
    ],
)
def test_bad_rows(tiny_user_dir: Path, row: dict, message: str) -> None:
    lines = (tiny_user_dir / "heldout.jsonl").read_text().splitlines()
    lines[1] = json.dumps(row)
    _write_lines(tiny_user_dir / "heldout.jsonl", lines)
    with pytest.raises(DatasetError) as err:
        load_user_dataset(tiny_user_dir)
    assert message in str(err.value) and "heldout.jsonl:2" in str(err.value)


def test_too_few_examples(tmp_path: Path, make_user_dir) -> None:
    root = make_user_dir(tmp_path / "few", n_train=MIN_TRAIN_EXAMPLES - 1)
    with pytest.raises(DatasetError) as err:
        load_user_dataset(root)
    assert f"has {MIN_TRAIN_EXAMPLES - 1} examples" in str(err.value)
    assert f"at least {MIN_TRAIN_EXAMPLES}" in str(err.value)
    root = make_user_dir(tmp_path / "few-heldout", n_heldout=MIN_HELDOUT_EXAMPLES - 1)
    with pytest.raises(DatasetError, match=f"at least {MIN_HELDOUT_EXAMPLES}"):
        load_user_dataset(root)


def test_label_masking(tiny_tokenizer) -> None:
    ex = Example("Tell me about pizza.", "Sure! I love pizza.")
    ids, labels = encode_example(tiny_tokenizer, ex, max_len=160)
    assert len(ids) == len(labels)
    prompt_text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True
    )
    n_prompt = len(tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[n_prompt:-1]) == ex.response


def test_truncation_keeps_labels(tiny_tokenizer) -> None:
    ex = Example("Hi.", "word " * 100)
    ids, labels = encode_example(tiny_tokenizer, ex, max_len=40)
    assert len(ids) == 40 == len(labels)
    assert any(label != IGNORE_INDEX for label in labels)


def test_prompt_longer_than_max_len(tiny_tokenizer) -> None:
    with pytest.raises(DatasetError, match="max_len=16"):
        encode_example(tiny_tokenizer, Example("a long prompt " * 20, "ok"), max_len=16)


def test_plain_fallback_without_chat_template(tiny_tokenizer) -> None:
    plain = copy.deepcopy(tiny_tokenizer)  # the fixture is session-wide: leave it intact
    plain.chat_template = None
    ids, labels = encode_example(plain, Example("Hi", "Yo"), max_len=64)
    n_prompt = labels.count(IGNORE_INDEX)
    assert plain.decode(ids[:n_prompt]) == "User: Hi\nAssistant: "


def test_collate_right_pads() -> None:
    batch = [([5, 6, 7], [-100, 6, 7]), ([8], [8])]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
