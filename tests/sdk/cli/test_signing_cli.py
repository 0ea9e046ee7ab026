"""`lowra keys`, `lowra sign`, `compress --sign-key` and `inspect` of signed files: round trips, refusals (exit 2,
one line, nothing written) and an encrypted blob that never shows what it holds."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from lowra.device_runtime.formats import signed
from lowra.device_runtime.formats.quantized_base import read_quantized_base
from lowra.device_runtime.trust import TrustPolicy, keyring, open_blob
from lowra.sdk.adapters.peft_io import save_adapter
from lowra.sdk.cli.main import main

from tests.conftest import build_tiny_model
from tests.sdk.cli.conftest import LORA, random_adapter


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keys(tmp_path, capsys) -> Path:
    folder = tmp_path / "keys"
    assert run(capsys, "keys", "new", "--dir", folder, "--name", "server")[0] == 0
    return folder


def sign(capsys, blob: Path, keys: Path, out: Path, *extra: str) -> Path:
    code, _, err = run(capsys, "sign", blob, "--key", keys / "server.key.pem", "--out", out, "--user-id", "u", *extra)
    assert code == 0, err
    return out


def test_keys_new_list_revoke_round_trip(tmp_path, capsys):
    folder = tmp_path / "keys"
    code, out, _ = run(capsys, "keys", "new", "--dir", folder, "--name", "server")
    assert code == 0
    key_id = out.split()[2]
    assert len(key_id) == 32 and str(folder / "server.key.pem") in out and str(folder / "server.pub.pem") in out
    assert mode(folder / "server.key.pem") == 0o600 and mode(folder) == 0o700
    assert mode(folder / "server.pub.pem") & 0o044  # public: readable as the umask allows
    assert run(capsys, "keys", "new", "--dir", folder, "--name", "old")[0] == 0

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, _, err = run(capsys, "keys", "new", "--dir", folder, "--name", "server")
    assert code == 2 and err.startswith("lowra keys new: error:") and "already exists" in err
    assert err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    code, out, _ = run(capsys, "keys", "list", "--dir", folder)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert code == 0 and [r[0] for r in rows] == ["old", "server"]
    assert rows[1] == ["server", key_id, "yes", "no"]

    assert run(capsys, "keys", "revoke", "--dir", folder, key_id)[0] == 0
    rows = [line.split() for line in run(capsys, "keys", "list", "--dir", folder)[1].splitlines()[1:]]
    assert rows[0][3] == "no" and rows[1][3] == "yes"
    assert signed.decode_revocations((folder / "revocations.json").read_bytes()) == {key_id}

    code, _, err = run(capsys, "keys", "revoke", "--dir", folder, "0" * 32)
    assert code == 2 and "no key with id" in err


def test_new_encryption_key_is_private_and_never_overwritten(tmp_path, capsys):
    path = tmp_path / "alice.aes"
    assert run(capsys, "keys", "new-encryption-key", "--out", path)[0] == 0
    key = path.read_bytes()
    assert len(key) == 32 and mode(path) == 0o600
    code, _, err = run(capsys, "keys", "new-encryption-key", "--out", path)
    assert code == 2 and "already exists" in err and path.read_bytes() == key
    assert run(capsys, "keys", "new-encryption-key", "--out", path, "--force")[0] == 0
    assert path.read_bytes() != key and mode(path) == 0o600


def test_sign_then_inspect_with_and_without_keys(tiny_blob_file, keys, tmp_path, capsys):
    out = sign(capsys, tiny_blob_file, keys, tmp_path / "u.signed", "--device-id", "phone-1", "--expires-in", "30d",
               "--sequence", "7")
    key_id = json.loads(run(capsys, "inspect", out, "--json")[1])["signed"]["key_id"]

    code, text, _ = run(capsys, "inspect", out)
    assert code == 0 and "signature not verified (no key given" in text
    assert f"key id            {key_id}" in text and "encrypted         no" in text
    for claim in signed.CLAIM_KEYS:
        assert f"    {claim} " in text, claim
    assert "phone-1" in text and "(checksum ok)" in text

    code, text, _ = run(capsys, "inspect", out, "--trust", keys)
    assert code == 0 and f"verified with key {key_id} (server)" in text
    code, text, _ = run(capsys, "inspect", out, "--trust", keys / "server.pub.pem")
    assert code == 0 and "verified with key" in text

    info = json.loads(run(capsys, "inspect", out, "--json", "--modules", "--trust", keys)[1])
    assert info["signed"]["verified"] and info["signed"]["claims"]["sequence"] == 7
    assert info["signed"]["claims"]["user_id"] == "u" and info["signed"]["claims"]["device_id"] == "phone-1"
    assert info["signed"]["claims"]["body_bytes"] == tiny_blob_file.stat().st_size
    assert info["metadata"]["adapter_id"] == "u" and len(info["modules"]) == info["n_modules"] > 0
    assert json.loads(run(capsys, "inspect", tiny_blob_file, "--json")[1])["signed"] is None

    # unsigned input with --trust: nothing to verify, refused
    code, _, err = run(capsys, "inspect", tiny_blob_file, "--trust", keys)
    assert code == 2 and "is not signed" in err


def test_tampered_untrusted_and_revoked_files_fail_inspect_trust(tiny_blob_file, keys, tmp_path, capsys):
    out = sign(capsys, tiny_blob_file, keys, tmp_path / "u.signed")
    data = bytearray(out.read_bytes())
    data[-5] ^= 0x01  # a byte of the blob inside
    tampered = tmp_path / "tampered.signed"
    tampered.write_bytes(bytes(data))
    code, text, err = run(capsys, "inspect", tampered, "--trust", keys)
    assert code == 2 and text == "" and err.count("\n") == 1
    assert "the Ed25519 signature does not match key" in err and "modified after signing or forged" in err

    other = tmp_path / "other-keys"
    assert run(capsys, "keys", "new", "--dir", other, "--name", "attacker")[0] == 0
    code, _, err = run(capsys, "inspect", out, "--trust", other)
    assert code == 2 and "which this app does not trust" in err

    key_id = json.loads(run(capsys, "inspect", out, "--json")[1])["signed"]["key_id"]
    assert run(capsys, "keys", "revoke", "--dir", keys, key_id)[0] == 0
    code, _, err = run(capsys, "inspect", out, "--trust", keys)
    assert code == 2 and "which is revoked" in err


def test_sign_refusals_write_nothing(tiny_blob_file, keys, tmp_path, capsys):
    out = sign(capsys, tiny_blob_file, keys, tmp_path / "u.signed")
    first = out.read_bytes()
    code, _, err = run(capsys, "sign", tiny_blob_file, "--key", keys / "server.key.pem", "--out", out, "--user-id", "u")
    assert code == 2 and "already exists" in err and out.read_bytes() == first
    assert run(capsys, "sign", tiny_blob_file, "--key", keys / "server.key.pem", "--out", out, "--user-id", "u",
               "--force")[0] == 0
    assert out.read_bytes() != first  # issued again: a new time and sequence

    refusals = {
        "needs the user": ["--out", tmp_path / "a.signed"],
        "signed already": ["--out", tmp_path / "b.signed", "--user-id", "u"],
        "does not exist": ["--out", tmp_path / "c.signed", "--user-id", "u", "--encrypt-key-file", tmp_path / "no"],
    }
    for message, extra in refusals.items():
        source = out if message == "signed already" else tiny_blob_file
        code, _, err = run(capsys, "sign", source, "--key", keys / "server.key.pem", *extra)
        assert code == 2 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys", "u.lowra", "u.signed"]

    with pytest.raises(SystemExit) as exc:  # argparse: usage line + one error line, status 2
        main(["sign", str(tiny_blob_file), "--key", "k", "--out", "x", "--user-id", "u", "--expires-in", "3x"])
    assert exc.value.code == 2 and "not a positive duration" in capsys.readouterr().err


def test_encrypted_blob_shows_only_its_envelope(tiny_blob_file, keys, tmp_path, capsys):
    aes = tmp_path / "u.aes"
    assert run(capsys, "keys", "new-encryption-key", "--out", aes)[0] == 0
    out = sign(capsys, tiny_blob_file, keys, tmp_path / "u.enc", "--encrypt-key-file", aes)
    for argv in (["inspect", out, "--modules"], ["inspect", out, "--modules", "--trust", keys]):
        code, text, _ = run(capsys, *argv)
        assert code == 0 and "encrypted         yes (AES-256-GCM" in text
        assert "not shown: encrypted" in text
        assert "model.layers" not in text and "effective bits/param" not in text and "channel widths" not in text
    info = json.loads(run(capsys, "inspect", out, "--json", "--modules")[1])
    assert info["signed"]["encrypted"] and set(info) == {"signed"}
    blob = open_blob(out, TrustPolicy(trusted_keys=keyring([keys / "server.pub.pem"])), user_id="u",
                     decryption_key=aes.read_bytes())
    assert blob.adapter_id == "u"


def test_compress_sign_key_end_to_end(tiny_base_dir, keys, tmp_path, capsys):
    model = build_tiny_model()
    random_adapter(model)
    save_adapter(model, "u", tmp_path / "adapter", LORA)
    blob = tmp_path / "u.signed"
    common = ["compress", "--adapter", tmp_path / "adapter", "--base", tiny_base_dir, "--bits", "8.0", "--out", blob]

    # refused before any work, nothing written: claims without a key, a key without the user
    code, _, err = run(capsys, *common, "--user-id", "alice")
    assert code == 2 and "--user-id only apply to a signed blob" in err
    code, _, err = run(capsys, *common, "--sign-key", keys / "server.key.pem")
    assert code == 2 and "--sign-key needs --user-id" in err
    code, _, err = run(capsys, *common, "--sign-key", tmp_path / "missing.key.pem", "--user-id", "alice")
    assert code == 2 and "missing.key.pem does not exist" in err
    assert not blob.exists()

    code, out, err = run(capsys, *common, "--sign-key", keys / "server.key.pem", "--user-id", "alice",
                         "--sequence", "3", "--expires-in", "1d")
    assert code == 0, err
    assert "signed" in out and "effective bits/param with the signature" in out
    assert signed.is_signed(blob.read_bytes())
    info = json.loads(run(capsys, "inspect", blob, "--json", "--trust", keys)[1])
    claims = info["signed"]["claims"]
    assert info["signed"]["verified"] and claims["user_id"] == "alice" and claims["sequence"] == 3
    assert claims["subject"] == "adapter" and claims["base_content"] is None  # a model folder has no content digest
    assert claims["base_fingerprint"] == info["metadata"]["base_fingerprint"]
    loaded = open_blob(blob, TrustPolicy(trusted_keys=keyring([keys / "server.pub.pem"])), user_id="alice")
    assert loaded.claims["sequence"] == 3

    # on a quantized base, the signature also names that base's content (as `lowra sign --quantized-base` does)
    from lowra.sdk.quant.base.apply import quantize_model
    from lowra.sdk.quant.base.config import QuantizeConfig

    qfile = quantize_model(build_tiny_model(), QuantizeConfig(bits=8.0, group_size=32, calibration=None), progress=False).write(
        tmp_path / "base.lowra-base")
    on_q = tmp_path / "q.signed"
    code, _, err = run(capsys, *common[:-1], on_q, "--quantized-base", qfile, "--sign-key", keys / "server.key.pem",
                       "--user-id", "alice")
    assert code == 0, err
    claims = json.loads(run(capsys, "inspect", on_q, "--json")[1])["signed"]["claims"]
    assert claims["base_content"] == read_quantized_base(qfile).metadata["payload_sha256"]


def test_merge_with_trust_takes_signed_blobs_and_refuses_others(tiny_blob_file, tiny_base_dir, keys, tmp_path, capsys):
    """The device-side flags: a signed blob merges only with its key pinned and for its own user."""
    signed_blob = sign(capsys, tiny_blob_file, keys, tmp_path / "u.signed")
    base = ("--base", tiny_base_dir)
    code, _, err = run(capsys, "merge", "--blob", signed_blob, "--out", tmp_path / "m1", *base)
    assert code == 2 and "does not trust" in err and not (tmp_path / "m1").exists()
    code, _, err = run(capsys, "merge", "--blob", signed_blob, "--out", tmp_path / "m2", "--trust", keys,
                       "--user-id", "someone-else", *base)
    assert code == 2 and "belongs to user 'u'" in err and not (tmp_path / "m2").exists()
    code, _, err = run(capsys, "merge", "--blob", tiny_blob_file, "--out", tmp_path / "m3", "--trust", keys, *base)
    assert code == 2 and "not signed" in err
    code, out, err = run(capsys, "merge", "--blob", signed_blob, "--out", tmp_path / "m4", "--trust", keys,
                         "--user-id", "u", *base)
    assert code == 0, err
    unsigned = run(capsys, "merge", "--blob", tiny_blob_file, "--out", tmp_path / "m5", *base)
    assert unsigned[0] == 0
    assert (tmp_path / "m4" / "model.safetensors").read_bytes() == (tmp_path / "m5" / "model.safetensors").read_bytes()
