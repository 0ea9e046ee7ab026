"""`lowra --help`, every `lowra COMMAND --help` and `lowra inspect BLOB` run without torch.

They answer in a fraction of a second only if the parser and inspect never import torch (or transformers, or
tqdm); this runs them in a fresh interpreter where those imports fail and checks none got imported. Their speed
itself is measured by hand and in bench/, never asserted here.
"""
from __future__ import annotations

import json
from pathlib import Path

from lowra.sdk.cli.commands import COMMANDS

from tests.conftest import run_with_blocked_imports

BLOCKED = ("torch", "transformers", "tqdm")

# Runs each argv (a JSON list of lists in sys.argv[1]) through the real entry point and prints one JSON list of
# {argv, code, out, err}; --help leaves through argparse's SystemExit, which is its exit status.
_RUN_CLI = """
import contextlib, io, json, sys
from lowra.sdk.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def _run_cli_without_torch(argvs: list[list[str]]) -> list[dict[str, object]]:
    proc = run_with_blocked_imports(_RUN_CLI, blocked=BLOCKED, args=(json.dumps(argvs),))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        assert r["code"] in (0, None), r
    return results


def test_help_of_lowra_and_every_command_without_torch():
    commands = sorted(COMMANDS)
    results = _run_cli_without_torch([["--help"]] + [[name, "--help"] for name in commands])
    assert results[0]["out"].startswith("usage: lowra")
    for name in commands:
        assert name in results[0]["out"], name
    for name, r in zip(commands, results[1:]):
        assert r["out"].startswith(f"usage: lowra {name}"), r["out"][:200]


def test_inspect_without_torch(tiny_blob_file: Path):
    text, as_json = _run_cli_without_torch([["inspect", str(tiny_blob_file), "--modules"],
                                           ["inspect", str(tiny_blob_file), "--json", "--modules"]])
    assert "(checksum ok)" in text["out"] and "effective bits/param" in text["out"]
    info = json.loads(as_json["out"])
    assert info["metadata"]["adapter_id"] == "u"
    assert info["n_modules"] == len(info["modules"]) > 0


def test_inspect_signed_blob_without_torch(tiny_blob_file: Path, tmp_path: Path):
    from lowra.sdk.signing import new_key, sign_file

    key = new_key(tmp_path / "keys", "server")
    signed_blob = sign_file(tiny_blob_file, tmp_path / "u.signed", key.private_path, user_id="u")
    plain, verified, as_json = _run_cli_without_torch([
        ["inspect", str(signed_blob)],
        ["inspect", str(signed_blob), "--modules", "--trust", str(tmp_path / "keys")],
        ["inspect", str(signed_blob), "--json", "--trust", str(key.public_path)],
    ])
    assert "signature not verified (no key given" in plain["out"] and "(checksum ok)" in plain["out"]
    assert f"verified with key {key.key_id} (server)" in verified["out"]
    info = json.loads(as_json["out"])
    assert info["signed"]["verified"] and info["signed"]["key_id"] == key.key_id
    assert info["metadata"]["adapter_id"] == "u"
