"""The demo on the tiny model (every phase says what it does and how long it took), and its refusal of user ids
that cannot name its output folders, before it writes anything.

The demo writes each user's outputs to ``<out>/<id>/``, with the id read from the user's user.json. The real
SmolLM2 run is tests/test_end_to_end.py (slow).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowra.device_runtime.errors import OutputExistsError
from lowra.sdk.cli.demo import check_user_id, run_demo
from lowra.sdk.cli.demo_config import DemoConfig
from lowra.sdk.cli.main import main
from lowra.sdk.errors import ConfigError

from tests.conftest import build_tiny_model, write_user_dir


def _user_with_id(root: Path, user_id: str) -> Path:
    path = write_user_dir(root)
    card = json.loads((path / "user.json").read_text())
    (path / "user.json").write_text(json.dumps({**card, "id": user_id}))
    return path


@pytest.mark.parametrize("user_id", ["terse_notes", "user-1.v2", "José", "a.b"])
def test_plain_ids_pass(user_id):
    check_user_id(user_id, Path("users/x"))


@pytest.mark.parametrize(
    ("user_id", "why"),
    [
        ("", "empty"),
        ("/tmp/escape", "absolute"),
        ("C:escape", "absolute"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("..", "parent folder"),
        ("..hidden", "parent folder"),
        (".", "current"),
        ("line\nbreak", "non-printable"),
        ("nul\x00", "non-printable"),
    ],
)
def test_unsafe_ids_are_refused(user_id, why):
    with pytest.raises(ConfigError, match=why) as info:
        check_user_id(user_id, Path("users/x"))
    assert repr(user_id) in str(info.value) and "users/x" in str(info.value)


def test_demo_on_the_tiny_model_shows_every_phase(tmp_path, monkeypatch, capsys, tiny_tokenizer, tiny_user_dir):
    monkeypatch.setenv("LOWRA_CACHE", str(tmp_path / "cache"))  # the quantized base is cached there
    base = tmp_path / "tiny-base"
    build_tiny_model().save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    out = tmp_path / "demo"
    # tiny modules: the blob's header alone is ~3.6 bits/param, so the budgets are high
    config = DemoConfig(out=str(out), users=(str(tiny_user_dir),), steps=2, bits=8.0, sweep=(16.0,), base=str(base),
                        base_bits=8.0, max_new_tokens=4)
    report = run_demo(config)
    printed = capsys.readouterr().out
    for phase in ("loading the base", "base at 8 effective bits", "held-out loss of the base", "training 2 steps",
                  "held-out loss of the adapter", "compressing to 8 bits", "held-out loss at 8 bits",
                  "compressing to 16 bits", "held-out loss at 16 bits", "device runtime", "generating replies"):
        (line,) = [line for line in printed.splitlines() if phase in line and line.endswith(" s)")]
        assert float(line.rsplit("(", 1)[1].removesuffix(" s)")) >= 0, line
    (row,) = report["users"]
    assert [s["budget"] for s in row["sweep"]] == [8.0, 16.0]
    # The low-bit base's held-out loss is shown next to the full-precision base's, measured on the fp model.
    (line,) = [line for line in printed.splitlines() if "held-out loss of the base" in line]
    assert f"full-precision base {row['loss_base_fp']:.3f}" in line and row["loss_base_fp"] != row["loss_base"]
    assert row["max_abs_diff_device_vs_sdk"] < 1e-5
    for name in ("report.md", "report.json", "retained_gain.png", "tiny-user/tiny-user.lowra"):
        assert (out / name).is_file(), name
    assert row["blob"] == str(out / "tiny-user" / "tiny-user.lowra")
    # a second run refuses to overwrite without force, before loading anything, and leaves the output as it was
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError, match="--force"):
        run_demo(config)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["demo", "tiny-base", "tiny-user", "cache"])
    config.force = True
    config.sweep = ()
    report = run_demo(config)
    assert [s["budget"] for s in report["users"][0]["sweep"]] == [8.0]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["demo", "tiny-base", "tiny-user", "cache"])


def test_demo_refuses_an_escaping_id_before_writing(tmp_path):
    user = _user_with_id(tmp_path / "evil", "../escape")
    out = tmp_path / "out" / "demo"
    with pytest.raises(ConfigError, match="cannot name an output folder"):
        run_demo(DemoConfig(out=str(out), users=(str(user),)))
    assert not (tmp_path / "out").exists()


def test_cli_demo_refuses_duplicate_ids(tmp_path, capsys):
    a, b = _user_with_id(tmp_path / "a", "same"), _user_with_id(tmp_path / "b", "same")
    out = tmp_path / "out"
    assert main(["demo", "--users", f"{a},{b}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowra demo: error: ") and "share the id 'same'" in err
    assert not out.exists()
