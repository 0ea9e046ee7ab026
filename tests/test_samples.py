"""The sample per-user datasets in samples/users/ (fast, stdlib only, no torch)."""
from __future__ import annotations

import importlib.util
import json
import platform
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
USERS_DIR = SAMPLES / "users"
USERS = ["terse_notes", "python_help", "json_reply"]
FILES = ["train.jsonl", "heldout.jsonl", "user.json"]
META_KEYS = ["id", "task", "style", "source", "license", "n_train", "n_heldout"]


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_users", SAMPLES / "build_users.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(user: str, split: str) -> list[dict]:
    text = (USERS_DIR / user / f"{split}.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _meta(user: str) -> dict:
    return json.loads((USERS_DIR / user / "user.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("users")
    _load_builder().build(out)
    return out


@pytest.mark.parametrize("user", USERS)
def test_committed_files_match_regeneration(user, rebuilt):
    if user == "python_help":
        # the answers come from this interpreter's pydoc_data.topics, which
        # changes between CPython releases
        m = re.search(r"CPython (\d+\.\d+\.\d+)", _meta(user)["source"])
        assert m, "python_help user.json must name the CPython version it was built with"
        if m.group(1) != platform.python_version():
            pytest.skip(f"built with CPython {m.group(1)}, running {platform.python_version()}")
    assert sorted(p.name for p in (rebuilt / user).iterdir()) == sorted(FILES)
    for name in FILES:
        assert (rebuilt / user / name).read_bytes() == (USERS_DIR / user / name).read_bytes(), (
            f"samples/users/{user}/{name} is stale: run python samples/build_users.py")


def test_build_is_deterministic(tmp_path):
    mod = _load_builder()
    mod.build(tmp_path / "a")
    mod.build(tmp_path / "b")
    for user in USERS:
        for name in FILES:
            assert (tmp_path / "a" / user / name).read_bytes() == \
                (tmp_path / "b" / user / name).read_bytes()


@pytest.mark.parametrize("user", USERS)
def test_jsonl_format(user):
    for split in ["train", "heldout"]:
        raw = (USERS_DIR / user / f"{split}.jsonl").read_bytes()
        raw.decode("utf-8")
        for row in _rows(user, split):
            assert list(row) == ["prompt", "response"]
            for key in ("prompt", "response"):
                assert isinstance(row[key], str) and row[key].strip()
            # short enough that max length 160 tokens never truncates a response
            assert len(row["prompt"]) + len(row["response"]) <= 400


@pytest.mark.parametrize("user", USERS)
def test_meta_and_counts(user):
    meta = _meta(user)
    assert list(meta) == META_KEYS
    assert meta["id"] == user
    for key in ("task", "style", "source", "license"):
        assert isinstance(meta[key], str) and meta[key].strip() and "\n" not in meta[key]
    assert meta["n_train"] == len(_rows(user, "train"))
    assert meta["n_heldout"] == len(_rows(user, "heldout"))
    assert 200 <= meta["n_train"] <= 300
    assert 30 <= meta["n_heldout"] <= 60


@pytest.mark.parametrize("user", USERS)
def test_train_heldout_disjoint_and_unique(user):
    train = [r["prompt"] for r in _rows(user, "train")]
    heldout = [r["prompt"] for r in _rows(user, "heldout")]
    assert len(set(train)) == len(train)
    assert len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)


@pytest.mark.parametrize("user", USERS)
def test_user_folder_small(user):
    size = sum(p.stat().st_size for p in (USERS_DIR / user).iterdir())
    assert size < 1_000_000


def _all_rows(user):
    return _rows(user, "train") + _rows(user, "heldout")


def test_terse_notes_style():
    for row in _all_rows("terse_notes"):
        lines = row["response"].split("\n")
        assert 2 <= len(lines) <= 4, row
        for line in lines:
            assert line.startswith("- ") and len(line) > 2, row
            assert line == line.lower(), row
            assert not re.search(r"\b(a|an|the|meeting|with|tomorrow)\b", line), row


def test_python_help_style():
    meta = _meta("python_help")
    held_topics = set(meta["source"].split("held-out topics: ")[1].split(", "))

    def topic(resp):
        m = re.match(r"Python docs \(([\w-]+)\): \S", resp)
        assert m, resp
        return m.group(1)

    train_topics = {topic(r["response"]) for r in _rows("python_help", "train")}
    heldout_topics = {topic(r["response"]) for r in _rows("python_help", "heldout")}
    assert not train_topics & heldout_topics
    assert heldout_topics == held_topics
    for row in _all_rows("python_help"):
        assert row["response"].endswith((".", "!", "?"))
        assert "\n" not in row["response"] and "  " not in row["response"]


def test_json_reply_style():
    intents = set()
    for row in _all_rows("json_reply"):
        obj = json.loads(row["response"])
        assert list(obj) == ["intent", "entities", "reply"]
        assert isinstance(obj["intent"], str) and isinstance(obj["entities"], dict)
        assert isinstance(obj["reply"], str) and obj["reply"]
        # compact separators, key order as written
        assert json.dumps(obj, ensure_ascii=False, separators=(",", ":")) == row["response"]
        intents.add(obj["intent"])
    assert len(intents) >= 8
