"""liblowra's signature checks (src/signed.cpp, src/trust.cpp) against the Python TrustPolicy: every signed,
encrypted, re-signed or damaged file is accepted or refused by both with the same error kind, a good one merges to
the same weights, and the replay store and the revocation list mean the same on both sides."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lowra.device_runtime.errors import (
    BaseMismatchError,
    BlobContentError,
    DecryptionKeyError,
    ExpiredFileError,
    ForgedSignatureError,
    PayloadTamperedError,
    ReplayedFileError,
    RevokedKeyError,
    UnsignedFileError,
    UntrustedKeyError,
    WrongRecipientError,
)
from lowra.device_runtime.formats import signed
from lowra.device_runtime.runtime import DeviceRuntime
from lowra.device_runtime.trust import FileSequenceStore, TrustPolicy, keyring
from lowra.sdk.signing import adapter_base_content, load_private_key, new_key, sign_bytes

from tests.device_runtime.conftest import make_blob_bytes
from tests.device_runtime.native.liblowra import Liblowra
from tests.device_runtime.native.test_liblowra import blob_for, dyadic_levels, python_error, write_quantized

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def native(build_dir) -> Liblowra:
    return Liblowra(build_dir / "liblowra.so")


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    server, other = new_key(folder, "server"), new_key(folder, "attacker")
    return SimpleNamespace(server=server, other=other, private=load_private_key(server.private_path),
                           attacker=load_private_key(other.private_path),
                           public=server.public_path.read_bytes())


def sign(body: bytes, key, **kw) -> bytes:
    kw.setdefault("user_id", "alice")
    kw.setdefault("now", NOW)
    kw.setdefault("sequence", 5)
    return sign_bytes(body, key, **kw)


def envelope(claims: bytes, payload: bytes, key, flags: int | None = None, version: int = 1) -> bytes:
    """A signed file around any claims bytes (canonical or not), signed with ``key``: what a buggy or hostile issuer
    holding a trusted key could write."""
    if flags is None:
        flags = signed.FLAG_ENCRYPTED if b'"encryption":{' in claims else 0
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    head = signed.PREFIX.pack(signed.MAGIC, version, flags, bytes.fromhex(signed.key_id(raw)), len(claims),
                              len(payload)) + claims
    return head + payload + key.sign(head + payload)


def reseal(data: bytes, key, edit=None, raw_claims: bytes | None = None, payload: bytes | None = None) -> bytes:
    """``data``'s envelope with its claims edited (``edit(claims)``) or replaced, re-signed with ``key``."""
    env = signed.read_unverified(data)
    claims = dict(env.claims)
    if edit:
        edit(claims)
    body = raw_claims if raw_claims is not None else signed.canonical_json(claims)
    return envelope(body, bytes(env.payload) if payload is None else payload, key,
                    flags=signed.FLAG_ENCRYPTED if env.encrypted else 0)


def python_policy(keys, **kw) -> TrustPolicy:
    kw.setdefault("clock", lambda: NOW)
    return TrustPolicy(trusted_keys=keyring([keys.server.public_path]), **kw)


def native_trust(native, keys, revoked=(), allow_unsigned=-1, device_id=None, sequence_file=None, pin=True):
    revocations = signed.encode_revocations(revoked) if revoked else None
    return native.trust([keys.public] if pin else [], revocations, allow_unsigned, device_id, sequence_file,
                        NOW.timestamp())


def load_both(native, base: Path, keys, data: bytes, user_id=None, key=None, policy_kw=None, trust_kw=None):
    """(Python error kind, native error kind, the runtimes) of loading ``data`` on ``base`` under equal policies."""
    runtime = DeviceRuntime(base, trust=python_policy(keys, **(policy_kw or {})))
    trust = native_trust(native, keys, **(trust_kw or {}))
    handle = native.open(base, trust)
    py = python_error(lambda: runtime.load_user(data, user_id=user_id, decryption_key=key))
    nat = python_error(lambda: native.load(handle, data, user_id=user_id, decryption_key=key))
    return py, nat, runtime, handle


def assert_alike(native, base, keys, data, expected, **kw):
    py, nat, runtime, handle = load_both(native, base, keys, data, **kw)
    try:
        assert py is expected, f"python: {py}"
        assert nat is expected, f"native: {nat}"
        if expected is None:  # the same merged weights (the user's modules merged alike, bit for bit)
            for module in runtime.user.modules:
                name = f"{module}.weight"
                assert native.digest(handle, name) == hashlib.sha256(
                    np.ascontiguousarray(runtime.weight(name), dtype=np.float32).tobytes()).hexdigest()
    finally:
        native.close(handle)


def test_a_signed_blob_merges_like_the_unsigned_one(native, tiny_base, keys):
    blob = make_blob_bytes(tiny_base, adapter_id="alice-adapter")
    data = sign(blob, keys.private, expires_in=dt.timedelta(days=1))
    trust = native_trust(native, keys)
    assert trust.key_ids == [keys.server.key_id]
    signed_handle, plain_handle = native.open(tiny_base, trust), native.open(tiny_base)
    try:
        info = native.load(signed_handle, data, user_id="alice")
        native.load(plain_handle, blob)
        assert info.adapter_id == b"alice-adapter" and info.file_bytes == len(blob)
        for name in native.tensor_names(plain_handle):
            assert native.digest(signed_handle, name) == native.digest(plain_handle, name)
    finally:
        native.close(signed_handle)
        native.close(plain_handle)
    assert_alike(native, tiny_base, keys, data, None, user_id="alice")


def test_raw_and_pem_keys_pin_the_same_id(native, keys):
    from cryptography.hazmat.primitives import serialization

    raw = keys.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert native.trust([raw]).key_ids == native.trust([keys.public]).key_ids == [signed.key_id(raw)]
    for bad in (b"x" * 31, b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"):
        with pytest.raises(BlobContentError, match="not an Ed25519 public key"):
            native.trust([bad])
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

    pem = rsa_keys.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(BlobContentError, match="expected Ed25519"):
        native.trust([pem])


def test_every_policy_refusal_has_the_same_kind(native, tiny_base, keys):
    blob = make_blob_bytes(tiny_base, adapter_id="alice-adapter")
    good = sign(blob, keys.private)
    cases = [
        ("good", good, {}, None),
        ("right user", good, {"user_id": "alice"}, None),
        ("other user", good, {"user_id": "bob"}, WrongRecipientError),
        ("attacker's key", sign(blob, keys.attacker), {}, UntrustedKeyError),
        ("revoked", good, {"policy_kw": {"revoked_keys": {keys.server.key_id}},
                           "trust_kw": {"revoked": [keys.server.key_id.upper()]}}, RevokedKeyError),
        ("unsigned, key pinned", blob, {}, UnsignedFileError),
        ("unsigned, allowed", blob, {"policy_kw": {"allow_unsigned": True}, "trust_kw": {"allow_unsigned": 1}}, None),
        ("expired", sign(blob, keys.private, now=NOW - dt.timedelta(days=2), expires_in=dt.timedelta(days=1)), {},
         ExpiredFileError),
        ("expired within the skew", sign(blob, keys.private, now=NOW - dt.timedelta(days=1, minutes=4),
                                         expires_in=dt.timedelta(days=1)), {}, None),
        ("future", sign(blob, keys.private, now=NOW + dt.timedelta(minutes=6)), {}, ExpiredFileError),
        ("future within the skew", sign(blob, keys.private, now=NOW + dt.timedelta(minutes=4)), {}, None),
        ("other device", sign(blob, keys.private, device_id="phone-1"), {}, WrongRecipientError),
        ("this device", sign(blob, keys.private, device_id="phone-1"),
         {"policy_kw": {"device_id": "phone-1"}, "trust_kw": {"device_id": "phone-1"}}, None),
    ]
    for name, data, kw, expected in cases:
        py, nat, _, handle = load_both(native, tiny_base, keys, data, **kw)
        native.close(handle)
        assert (py, nat) == (expected, expected), name


def test_encrypted_blobs(native, tiny_base, keys):
    blob = make_blob_bytes(tiny_base, adapter_id="alice-adapter")
    aes, other = bytes(range(32)), bytes(range(1, 33))
    data = sign(blob, keys.private, encryption_key=aes)
    assert_alike(native, tiny_base, keys, data, None, key=aes)
    assert_alike(native, tiny_base, keys, data, DecryptionKeyError)
    assert_alike(native, tiny_base, keys, data, DecryptionKeyError, key=other)
    assert_alike(native, tiny_base, keys, data, DecryptionKeyError, key=aes[:16])
    # Under a valid signature: a ciphertext that fails authentication, and a plaintext that is not the signed one.
    env = signed.read_unverified(data)
    broken = bytearray(env.payload)
    broken[3] ^= 1
    assert_alike(native, tiny_base, keys, reseal(data, keys.private, payload=bytes(broken)), PayloadTamperedError,
                 key=aes)
    wrong_digest = reseal(data, keys.private, lambda c: c.update(body_sha256="0" * 64))
    assert_alike(native, tiny_base, keys, wrong_digest, PayloadTamperedError, key=aes)
    # An unencrypted blob does not need a key, and a key given for it is ignored.
    assert_alike(native, tiny_base, keys, sign(blob, keys.private), None, key=aes)


def damaged(good: bytes, blob: bytes, keys) -> dict[str, bytes]:
    """Signed files that are wrong in one way each: bytes flipped or cut, envelope fields, claims re-signed."""
    head = signed.PREFIX.size
    claims_len = struct.unpack_from("<I", good, 28)[0]
    cases = {}
    for pos in (0, 8, 9, 10, 11, 12, 27, 28, 31, 32, 39, head + 3, head + claims_len + 100, len(good) - 1):
        flipped = bytearray(good)
        flipped[pos] ^= 0x40
        cases[f"flip {pos}"] = bytes(flipped)
    cases["cut"] = good[:-1]
    cases["appended"] = good + b"\0"
    cases["too short"] = good[:100]
    cases["empty"] = b""
    cases["magic only"] = signed.MAGIC
    env = signed.read_unverified(good)
    canonical = signed.canonical_json(env.claims)
    payload = bytes(env.payload)
    cases["flags 2"] = envelope(canonical, payload, keys.private, flags=2)
    cases["flag without encryption claim"] = envelope(canonical, payload, keys.private, flags=1)
    cases["version 2"] = envelope(canonical, payload, keys.private, version=2)
    cases["spaces"] = envelope(json.dumps(env.claims, sort_keys=True).encode(), payload, keys.private)
    cases["unsorted"] = envelope(json.dumps(dict(reversed(list(env.claims.items()))),
                                            separators=(",", ":")).encode(), payload, keys.private)
    cases["non-ascii byte"] = envelope(canonical.replace(b'"alice"', b'"al\xc3\xafce"'), payload, keys.private)
    cases["duplicate key"] = envelope(canonical[:-1] + b',"alg":"Ed25519"}', payload, keys.private)
    cases["not json"] = envelope(b"{" + canonical, payload, keys.private)
    cases["list"] = envelope(b"[1]", payload, keys.private)
    edits = {
        "extra key": lambda c: c.update(extra=1),
        "missing key": lambda c: c.pop("device_id"),
        "sequence 0": lambda c: c.update(sequence=0),
        "sequence float": lambda c: c.update(sequence=5.0),
        "sequence bool": lambda c: c.update(sequence=True),
        "sequence 2**53": lambda c: c.update(sequence=2**53),
        "sequence huge": lambda c: c.update(sequence=10**30),
        "body_bytes wrong": lambda c: c.update(body_bytes=c["body_bytes"] + 1),
        "body_bytes negative": lambda c: c.update(body_bytes=-1),
        "alg": lambda c: c.update(alg="RSA"),
        "format": lambda c: c.update(format="lowra-base"),
        "format_version": lambda c: c.update(format_version=3),
        "subject": lambda c: c.update(subject="bob-adapter"),
        "base_fingerprint": lambda c: c.update(base_fingerprint="sha256:" + "0" * 64),
        "base_fingerprint null": lambda c: c.update(base_fingerprint=None),
        "user_id number": lambda c: c.update(user_id=5),
        "user_id escaped": lambda c: c.update(user_id="al\u00efce\u001f"),
        "device_id list": lambda c: c.update(device_id=["x"]),
        "issued_at space": lambda c: c.update(issued_at="2026-11-29 12:00:00+00:00"),
        "issued_at naive": lambda c: c.update(issued_at="2026-11-29T12:00:00"),
        "issued_at Z": lambda c: c.update(issued_at="2026-11-29T11:00:00Z"),
        "issued_at fraction": lambda c: c.update(issued_at="2026-11-29T11:00:00.123456+03:30"),
        "issued_at fraction 7": lambda c: c.update(issued_at="2026-11-29T11:00:00.1234567Z"),
        "issued_at feb 30": lambda c: c.update(issued_at="2026-02-30T11:00:00Z"),
        "issued_at feb 29 leap": lambda c: c.update(issued_at="2024-02-29T11:00:00Z"),
        "issued_at year 1": lambda c: c.update(issued_at="0001-01-01T00:00:00+01:00"),
        "issued_at year 9999": lambda c: c.update(issued_at="9999-12-31T23:59:59-01:00"),
        "issued_at hour 24": lambda c: c.update(issued_at="2026-11-29T24:00:00Z"),
        "issued_at offset 24": lambda c: c.update(issued_at="2026-11-29T11:00:00+24:00"),
        "issued_at basic": lambda c: c.update(issued_at="20261129T110000Z"),
        "issued_at number": lambda c: c.update(issued_at=1),
        "expires_at past": lambda c: c.update(expires_at="2026-11-29T11:54:59+00:00"),
        "expires_at edge": lambda c: c.update(expires_at="2026-11-29T11:55:00+00:00"),
        "expires_at garbage": lambda c: c.update(expires_at="soon"),
        "encryption without flag": lambda c: c.update(encryption={"alg": "AES-256-GCM", "nonce": "00" * 12,
                                                                  "key_check": "00" * 8}),
        "body_sha256 number": lambda c: c.update(body_sha256=1),
    }
    for name, edit in edits.items():
        cases[name] = reseal(good, keys.private, edit)
    plain = envelope(canonical, payload, keys.private)
    assert plain == good[: len(plain) - 64] + plain[-64:]  # the helper writes what sign_bytes writes
    aes = bytes(range(32))
    encrypted = sign(blob, keys.private, encryption_key=aes)
    for name, enc in {"nonce with spaces": {"nonce": "00 " + "11" * 10 + "2"},
                      "nonce short": {"nonce": "00" * 11},
                      "key_check upper": {"key_check": signed.key_check(aes).upper()},
                      "cipher": {"alg": "AES-128-GCM"},
                      "extra field": {"tag": "00"}}.items():
        cases["encryption " + name] = reseal(
            encrypted, keys.private, lambda c, enc=enc: c.update(encryption={**c["encryption"], **enc}))
    return cases


def test_damaged_and_re_signed_files_are_refused_alike(native, tiny_base, keys):
    blob = make_blob_bytes(tiny_base, adapter_id="alice-adapter")
    good = sign(blob, keys.private)
    aes = bytes(range(32))
    kinds = {}
    for name, data in damaged(good, blob, keys).items():
        py, nat, _, handle = load_both(native, tiny_base, keys, data, user_id="alice", key=aes)
        native.close(handle)
        assert py is nat, f"{name}: python {py}, native {nat}"
        kinds[name] = py
    # Every case means something: refused, except the spellings both accept.
    accepted = {n for n, k in kinds.items() if k is None}
    assert accepted == {"issued_at Z", "issued_at fraction", "issued_at feb 29 leap", "issued_at year 1",
                        "expires_at edge"}, accepted
    assert kinds["encryption key_check upper"] is DecryptionKeyError  # compared as written: lower-case hex
    assert kinds[f"flip {len(good) - 1}"] is ForgedSignatureError
    assert kinds["flip 12"] is UntrustedKeyError
    assert kinds["issued_at year 9999"] is ExpiredFileError and kinds["expires_at past"] is ExpiredFileError
    assert kinds["subject"] is BlobContentError and kinds["user_id escaped"] is WrongRecipientError


def test_replays_are_refused_and_the_store_is_shared_with_python(native, tiny_base, keys, tmp_path):
    blob = make_blob_bytes(tiny_base, adapter_id="alice-adapter")
    other_body = make_blob_bytes(tiny_base, seed=7, adapter_id="alice-adapter")
    store = tmp_path / "sequences.json"
    trust = native_trust(native, keys, sequence_file=store)
    policy = python_policy(keys)
    handle = native.open(tiny_base, trust)
    runtime = DeviceRuntime(tiny_base, trust=policy)
    steps = [(sign(blob, keys.private, sequence=5), None), (sign(blob, keys.private, sequence=4), ReplayedFileError),
             (sign(blob, keys.private, sequence=5), None),  # the same file again: a swap back
             (sign(other_body, keys.private, sequence=5), ReplayedFileError),  # an equivocating issuer
             (sign(other_body, keys.private, sequence=6), None),
             (sign(blob, keys.private, sequence=3, user_id="carol"), None)]  # another user's own sequence
    try:
        for i, (data, expected) in enumerate(steps):
            user = "carol" if i == 5 else "alice"
            assert python_error(lambda: runtime.load_user(data, user_id=user)) is expected, i
            assert python_error(lambda: native.load(handle, data, user_id=user)) is expected, i
    finally:
        native.close(handle)
    # The file the native store wrote is what FileSequenceStore reads, and the other way round.
    python_store = FileSequenceStore(store)
    assert python_store._seen == {"alice\x1falice-adapter": (6, signed.read_unverified(steps[4][0]).claims["body_sha256"]),
                                  "carol\x1falice-adapter": (3, signed.read_unverified(steps[5][0]).claims["body_sha256"])}
    python_store.check_and_record("alice", "alice-adapter", 9, "ab" * 32, "x")
    restarted = native.open(tiny_base, native_trust(native, keys, sequence_file=store))
    try:
        with pytest.raises(ReplayedFileError, match="older than the accepted 9"):
            native.load(restarted, steps[4][0], user_id="alice")
    finally:
        native.close(restarted)
    store.write_text('{"alice\\u001falice-adapter": [1]}')
    with pytest.raises(BlobContentError, match="corrupt"):
        native_trust(native, keys, sequence_file=store)
    with pytest.raises(BlobContentError, match="corrupt"):
        FileSequenceStore(store)


def test_revocation_lists_are_read_alike(native, keys):
    good = signed.encode_revocations([keys.server.key_id.upper()])
    assert signed.decode_revocations(good) == {keys.server.key_id}
    native.trust([keys.public], revocations=good)
    bad_lists = [b"", b"[]", b'{"format": "lowra-revocations", "format_version": 1}',
                 b'{"format": "lowra-revocations", "format_version": true, "revoked": []}',
                 b'{"format": "lowra-revocations", "format_version": 1.0, "revoked": []}',
                 b'{"format": "lowra-revocations", "format_version": 1, "revoked": ["00 11"]}',
                 b'{"format": "lowra-revocations", "format_version": 1, "revoked": ["' + b"0" * 31 + b' "]}',
                 b'{"format": "lowra-revocations", "format_version": 1, "revoked": [], "revoked": []}',
                 b'\xff']
    for data in bad_lists:
        with pytest.raises(BlobContentError):
            signed.decode_revocations(data)
        with pytest.raises(BlobContentError):
            native.trust([keys.public], revocations=data)


def test_signed_bases_and_base_content_claims(native, tmp_path, keys):
    base = write_quantized(tmp_path / "base.lowra")
    other = write_quantized(tmp_path / "other.lowra", seed=3)
    signed_base = tmp_path / "signed.lowra"
    signed_base.write_bytes(sign(base.read_bytes(), keys.private, user_id=None))
    trust = native_trust(native, keys)
    plain, checked = native.open(base), native.open(signed_base, trust)
    try:
        names = native.tensor_names(plain)
        assert native.tensor_names(checked) == names
        for name in names:
            if name != "model.position_ids":  # int64: no float32 digest
                assert native.digest(checked, name) == native.digest(plain, name)
        body = blob_for(base, dyadic_levels, adapter_id="alice-adapter")
        content = adapter_base_content(body, base)
        bound = sign(body, keys.private, base_content=content)
        assert_alike(native, signed_base, keys, bound, None)
        assert_alike(native, base, keys, bound, None, policy_kw={"allow_unsigned": True},
                     trust_kw={"allow_unsigned": 1})
        assert_alike(native, signed_base, keys, sign(body, keys.private, base_content="0" * 64), BaseMismatchError)
    finally:
        native.close(plain)
        native.close(checked)
    for name, path, kw, expected in [
        ("default policy", signed_base, None, UntrustedKeyError),
        ("unsigned base, key pinned", base, trust, UnsignedFileError),
    ]:
        py = python_error(lambda: DeviceRuntime(path, trust=TrustPolicy() if kw is None else python_policy(keys)))
        nat = python_error(lambda: native.close(native.open(path, kw)))
        assert (py, nat) == (expected, expected), name
    # A base signed with claims of another base (re-signed by the trusted key), and a flipped byte.
    swapped = tmp_path / "swapped.lowra"
    swapped.write_bytes(reseal(signed_base.read_bytes(), keys.private,
                               lambda c: c.update(base_content=signed.read_unverified(
                                   sign(other.read_bytes(), keys.private, user_id=None)).claims["base_content"])))
    flipped = tmp_path / "flipped.lowra"
    data = bytearray(signed_base.read_bytes())
    data[len(data) // 2] ^= 1
    flipped.write_bytes(bytes(data))
    for path, expected in ((swapped, BlobContentError), (flipped, ForgedSignatureError)):
        py = python_error(lambda: DeviceRuntime(path, trust=python_policy(keys)))
        nat = python_error(lambda: native.close(native.open(path, native_trust(native, keys))))
        assert (py, nat) == (expected, expected), path.name


def test_a_model_folder_cannot_prove_base_content(native, tiny_base, keys):
    blob = make_blob_bytes(tiny_base, adapter_id="alice-adapter")
    assert_alike(native, tiny_base, keys, sign(blob, keys.private, base_content="ab" * 32), BaseMismatchError)


def test_example_app_checks_signed_blobs(build_dir, tiny_base, keys, tmp_path):
    """lowra_chat --key/--user/--decryption-key: a signed, encrypted blob loads; the same blob for another user, a
    forged one and an unsigned one are refused with their codes, and the user loaded before stays."""
    aes = bytes(range(32))
    (tmp_path / "user.key").write_bytes(aes)
    (tmp_path / "server.pub.pem").write_bytes(keys.public)
    files = {}
    for name, user in (("alice", "alice"), ("bob", "bob")):
        body = make_blob_bytes(tiny_base, adapter_id=f"{name}-adapter")
        files[name] = tmp_path / f"{name}.lowra"
        files[name].write_bytes(sign_bytes(body, keys.private, user_id=user, sequence=1, encryption_key=aes))
    files["unsigned"] = tmp_path / "unsigned.lowra"
    files["unsigned"].write_bytes(make_blob_bytes(tiny_base, adapter_id="x"))
    forged = bytearray(files["alice"].read_bytes())
    forged[-1] ^= 1
    files["forged"] = tmp_path / "forged.lowra"
    files["forged"].write_bytes(bytes(forged))
    script = "".join(f"load {files[n]}\n" for n in ("alice", "bob", "forged", "unsigned")) + "user\nquit\n"
    result = subprocess.run([str(build_dir / "lowra_chat"), "--key", str(tmp_path / "server.pub.pem"), "--user",
                             "alice", "--decryption-key", str(tmp_path / "user.key"), str(tiny_base)],
                            input=script, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("ok user alice-adapter")
    assert lines[2].startswith("error 20 ") and "belongs to user 'bob'" in lines[2]  # LOWRA_ERR_WRONG_RECIPIENT
    assert lines[3].startswith("error 14 ")  # LOWRA_ERR_FORGED
    assert lines[4].startswith("error 17 ")  # LOWRA_ERR_UNSIGNED
    assert lines[5] == "ok user alice-adapter"
    bad = subprocess.run([str(build_dir / "lowra_chat"), "--key", str(files["unsigned"]), str(tiny_base)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 2 and "not an Ed25519 public key" in bad.stdout
