"""Signed and encrypted files: every kind of refusal is its own error, and a good file opens to its exact bytes."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct

import numpy as np
import pytest

from lowra.device_runtime.errors import (
    BlobContentError,
    BlobError,
    BlobTruncatedError,
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
from lowra.device_runtime.formats import container, signed
from lowra.device_runtime.trust import FileSequenceStore, TrustPolicy, keyring
from lowra.sdk.signing import list_keys, load_private_key, new_encryption_key, new_key, revocations, revoke, sign_bytes
from tests.device_runtime.conftest import make_blob_bytes

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    server = new_key(folder, "server")
    other = new_key(folder, "attacker")
    return folder, load_private_key(server.private_path), load_private_key(other.private_path), server, other


@pytest.fixture
def blob(tiny_base):
    return make_blob_bytes(tiny_base, adapter_id="alice-adapter")


def policy(keys, **kw) -> TrustPolicy:
    folder, _, _, server, _ = keys
    kw.setdefault("clock", lambda: NOW)
    return TrustPolicy(trusted_keys=keyring([server.public_path]), **kw)


def sign(blob, key, **kw):
    kw.setdefault("user_id", "alice")
    kw.setdefault("now", NOW)
    kw.setdefault("sequence", 5)
    return sign_bytes(blob, key, **kw)


def open_(pol, data, **kw):
    return pol.open(data, fmt="lowra-adapter", what="blob", **kw)


def test_signed_blob_opens_to_its_exact_bytes_and_claims(keys, blob):
    signed_bytes = sign(blob, keys[1], expires_in=dt.timedelta(days=1))
    body, claims = open_(policy(keys), signed_bytes, user_id="alice")
    assert bytes(body) == blob
    assert claims["subject"] == "alice-adapter" and claims["user_id"] == "alice" and claims["sequence"] == 5
    assert claims["body_sha256"] == hashlib.sha256(blob).hexdigest()
    assert claims["expires_at"] == "2026-11-30T12:00:00+00:00"


def test_every_flipped_byte_is_refused_before_the_payload_is_used(keys, blob):
    data = sign(blob, keys[1])
    pol = policy(keys)
    head = signed.PREFIX.size
    for pos in (0, 9, 12, 29, head + 3, len(data) - 64 - len(blob) + 10, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(BlobError):  # forged, untrusted key, unsigned (magic flipped) or malformed
            open_(pol, bytes(bad))


def test_recomputed_checksum_without_the_key_is_a_forgery(keys, blob):
    """The attack that passed before signatures: edit codebooks, recompute the payload checksum, keep the rest."""
    data = bytearray(sign(blob, keys[1]))
    header = container.parse_header(blob, len(blob), "blob")
    info = header.tensors["codebooks"]
    body = bytearray(blob)
    levels = np.frombuffer(body, np.float16, (info.end - info.start) // 2, info.start).copy()
    levels[0] += np.float16(1.0)
    body[info.start:info.end] = levels.tobytes()
    tensors = {n: container.tensor_from_buffer(bytes(body), t) for n, t in header.tensors.items()}
    meta = dict(header.metadata)
    meta["payload_sha256"] = container.payload_digest(tensors, meta)
    forged_body = container.serialize(tensors, meta)
    data[len(data) - 64 - len(blob) : len(data) - 64] = forged_body[: len(blob)]  # the payload precedes the signature
    with pytest.raises(ForgedSignatureError, match="does not match key"):
        open_(policy(keys), bytes(data))


def test_resigned_with_an_untrusted_key(keys, blob):
    with pytest.raises(UntrustedKeyError, match="does not trust"):
        open_(policy(keys), sign(blob, keys[2]))


def test_expired_and_future_files(keys, blob):
    old = sign(blob, keys[1], now=NOW - dt.timedelta(days=10), expires_in=dt.timedelta(days=1))
    with pytest.raises(ExpiredFileError, match="expired at 2026-11-20"):
        open_(policy(keys), old)
    future = sign(blob, keys[1], now=NOW + dt.timedelta(days=1))
    with pytest.raises(ExpiredFileError, match="in the future"):
        open_(policy(keys), future)


@pytest.mark.parametrize("text, ok", [
    ("2026-11-29T11:00:00+00:00", True), ("2026-11-29T11:00:00Z", True), ("2026-11-29T11:00:00.5+01:00", True),
    ("2024-02-29T11:00:00Z", True), ("2026-11-29T11:00:00", False), ("2026-11-29 11:00:00Z", False),
    ("20261129T110000Z", False), ("2026-11-29T11:00Z", False), ("2026-02-29T11:00:00Z", False),
    ("2026-11-29T11:00:00.1234567Z", False), ("2026-11-29T11:00:00+24:00", False), ("2026-11-29T11:00:00+01", False),
])
def test_claim_times_have_one_spelling(keys, blob, text, ok):
    """RFC 3339 as docs/FORMAT.md spells it, nothing else Python's fromisoformat would take (liblowra parses the
    same set)."""
    data = signed.seal(blob, {**signed.read_unverified(sign(blob, keys[1])).claims, "issued_at": text},
                       keys[1])
    if ok:
        open_(policy(keys), data)
    else:
        with pytest.raises(BlobContentError, match="time"):
            open_(policy(keys), data)


def test_hex_fields_are_digits_only_and_key_ids_any_case(keys, blob):
    data = sign(blob, keys[1], encryption_key=bytes(32))
    claims = dict(signed.read_unverified(data).claims)
    claims["encryption"] = {**claims["encryption"], "nonce": "00 " + "11" * 10 + "2"}  # bytes.fromhex takes it
    envelope = signed.read_unverified(data)
    prefix = signed.PREFIX.pack(signed.MAGIC, 1, signed.FLAG_ENCRYPTED, bytes.fromhex(envelope.key_id),
                                len(signed.canonical_json(claims)), len(envelope.payload))
    body = prefix + signed.canonical_json(claims) + bytes(envelope.payload)
    with pytest.raises(BlobContentError, match="encryption"):
        open_(policy(keys), body + keys[1].sign(body))
    kid = keys[3].key_id
    assert signed.decode_revocations(signed.encode_revocations([kid.upper()])) == {kid}
    upper = json.dumps({"format": "lowra-revocations", "format_version": 1, "revoked": [kid.upper()]}).encode()
    assert signed.decode_revocations(upper) == {kid}
    with pytest.raises(RevokedKeyError):
        open_(policy(keys, revoked_keys=signed.decode_revocations(upper)), sign(blob, keys[1]))
    for bad in ('{"format": "lowra-revocations", "format_version": true, "revoked": []}',
                '{"format": "lowra-revocations", "format_version": 1, "revoked": ["' + " " * 2 + "0" * 30 + '"]}'):
        with pytest.raises(BlobContentError):
            signed.decode_revocations(bad.encode())


def test_revoked_key(keys, blob, tmp_path):
    folder, _, _, server, _ = keys
    revoke(folder, server.key_id)
    assert revocations(folder) == {server.key_id}
    assert [k.revoked for k in list_keys(folder)] == [False, True]  # attacker, server (sorted by name)
    with pytest.raises(RevokedKeyError, match="revoked"):
        open_(policy(keys, revoked_keys=revocations(folder)), sign(blob, keys[1]))


def test_replayed_and_rolled_back_files(keys, blob, tmp_path):
    store = FileSequenceStore(tmp_path / "seen.json")
    pol = policy(keys, sequences=store)
    v5, v6 = sign(blob, keys[1], sequence=5), sign(blob, keys[1], sequence=6)
    open_(pol, v5)
    open_(pol, v5)  # the same file again: a swap back to this user, allowed
    open_(pol, v6)
    with pytest.raises(ReplayedFileError, match="older than the accepted 6"):
        open_(pol, v5)
    # the store survives a restart of the app
    with pytest.raises(ReplayedFileError):
        open_(policy(keys, sequences=FileSequenceStore(tmp_path / "seen.json")), v5)
    other_body = sign(make_blob_bytes_other(blob), keys[1], sequence=6)
    with pytest.raises(ReplayedFileError, match="other content"):
        open_(pol, other_body)


def make_blob_bytes_other(blob: bytes) -> bytes:
    """The same adapter id and base with other codes: what a buggy issuer re-signing at an old sequence sends."""
    header = container.parse_header(blob, len(blob), "blob")
    tensors = {n: np.array(container.tensor_from_buffer(blob, t)) for n, t in header.tensors.items()}
    tensors["codes"] = tensors["codes"] ^ np.uint8(1)
    meta = dict(header.metadata)
    meta["payload_sha256"] = container.payload_digest(tensors, meta)
    return container.serialize(tensors, meta)


def test_cross_user_and_cross_device(keys, blob):
    data = sign(blob, keys[1], device_id="phone-1")
    with pytest.raises(WrongRecipientError, match="belongs to user 'alice', not to 'bob'"):
        open_(policy(keys, device_id="phone-1"), data, user_id="bob")
    with pytest.raises(WrongRecipientError, match="bound to device 'phone-1'"):
        open_(policy(keys, device_id="phone-2"), data, user_id="alice")
    open_(policy(keys, device_id="phone-1"), data, user_id="alice")


def test_unsigned_files_only_where_the_app_allows_them(keys, blob):
    with pytest.raises(UnsignedFileError, match="not signed"):
        open_(policy(keys), blob)
    assert open_(policy(keys, allow_unsigned=True), blob) == (blob, None)
    assert open_(TrustPolicy(), blob) == (blob, None)  # no key pinned: development mode


def test_encryption_wrong_key_and_tampering_are_distinct(keys, blob):
    key = new_encryption_key()
    data = sign(blob, keys[1], encryption_key=key)
    assert blob not in data and blob[100:200] not in data
    body, claims = open_(policy(keys), data, decryption_key=key)
    assert bytes(body) == blob and claims["encryption"]["alg"] == "AES-256-GCM"
    with pytest.raises(DecryptionKeyError, match="does not match"):
        open_(policy(keys), data, decryption_key=new_encryption_key())
    with pytest.raises(DecryptionKeyError, match="is encrypted"):
        open_(policy(keys), data)
    # a trusted issuer's signature over a corrupted ciphertext: authentication of the payload still fails
    envelope = signed.open_envelope(data, keyring([keys[3].public_path])[keys[3].key_id])
    tampered = bytearray(envelope.payload)
    tampered[5] ^= 1
    message = envelope.signed_prefix + bytes(tampered)
    resigned = message + keys[1].sign(message)
    with pytest.raises(PayloadTamperedError, match="tampered"):
        open_(policy(keys), resigned, decryption_key=key)


def test_malformed_envelopes_are_clear_errors(keys, blob):
    data = bytearray(sign(blob, keys[1]))
    struct.pack_into("<I", data, 28, 10**9)
    with pytest.raises(BlobContentError, match="claims length"):
        open_(policy(keys), bytes(data))
    with pytest.raises(BlobTruncatedError, match="too short"):
        signed.open_envelope(bytes(data[:40]), b"\0" * 32)
    assert signed.is_signed(bytes(sign(blob, keys[1]))) and not signed.is_signed(blob)


# ------------------------------------------------------------------------------------------------ in the runtime
def test_runtime_loads_signed_blobs_and_refuses_each_attack_distinctly(keys, blob, tiny_base, tmp_path):
    from lowra.device_runtime import DeviceRuntime

    folder, server_key, attacker_key, server, _ = keys
    rt = DeviceRuntime(tiny_base, trusted_keys=[server.public_path])
    good = sign_bytes(blob, server_key, user_id="alice", sequence=7)
    info = rt.load_user(good, user_id="alice")
    assert info.adapter_id == "alice-adapter"
    merged = {k: np.array(v) for k, v in rt.weights().items()}
    refusals = {
        ForgedSignatureError: bytes(good[:-1]) + bytes([good[-1] ^ 1]),
        UntrustedKeyError: sign_bytes(blob, attacker_key, user_id="alice", sequence=8),
        UnsignedFileError: blob,
        ReplayedFileError: sign_bytes(blob, server_key, user_id="alice", sequence=6),
        ExpiredFileError: sign_bytes(blob, server_key, user_id="alice", sequence=9, expires_in=dt.timedelta(seconds=1),
                                     now=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)),
    }
    for error, data in refusals.items():
        with pytest.raises(error):
            rt.load_user(data, user_id="alice")
    with pytest.raises(WrongRecipientError):
        rt.load_user(sign_bytes(blob, server_key, user_id="bob", sequence=10), user_id="alice")
    # every refusal left the active user in place
    assert rt.user.adapter_id == "alice-adapter"
    assert all(np.array_equal(v, merged[k]) for k, v in rt.weights().items())
    key = new_encryption_key()
    sealed = sign_bytes(blob, server_key, user_id="alice", sequence=11, encryption_key=key)
    with pytest.raises(DecryptionKeyError):
        rt.load_user(sealed, user_id="alice")
    assert rt.load_user(sealed, user_id="alice", decryption_key=key).adapter_id == "alice-adapter"
    assert all(np.array_equal(v, merged[k]) for k, v in rt.weights().items())


def test_signed_quantized_base_binds_adapters_to_its_content(keys, tmp_path):
    """An adapter signed for a base's content is refused on a base whose dense tensors were edited (checksum
    recomputed), and a signed base is authenticated before it is parsed."""
    from lowra.device_runtime import DeviceRuntime
    from lowra.device_runtime.errors import BaseMismatchError
    from lowra.device_runtime.formats.quantized_base import read_quantized_base, write_quantized_base
    from tests.device_runtime.formats.test_quantized_base import META, dense_tensors
    from tests.device_runtime.formats.test_quantized_base import layers as example_layers

    folder, server_key, _, server, _ = keys
    layers, dense = example_layers(np.random.default_rng(0)), dense_tensors()
    path = write_quantized_base(tmp_path / "base.lowra-base", layers, dense, META)
    edited_dense = {**dense, "model.embed_tokens.weight": dense["model.embed_tokens.weight"] + np.float16(1)}
    edited = write_quantized_base(tmp_path / "edited.lowra-base", layers, edited_dense, META)
    assert read_quantized_base(edited).fingerprint == read_quantized_base(path).fingerprint  # layers unchanged
    signed_base = tmp_path / "base.signed"
    signed_base.write_bytes(sign_bytes(path.read_bytes(), server_key, now=NOW))
    rt = DeviceRuntime(signed_base, trusted_keys=[server.public_path])
    assert rt.base.content_digest == read_quantized_base(path).metadata["payload_sha256"]
    tampered = bytearray(signed_base.read_bytes())
    tampered[-3] ^= 1
    (tmp_path / "tampered.signed").write_bytes(bytes(tampered))
    with pytest.raises(ForgedSignatureError):
        DeviceRuntime(tmp_path / "tampered.signed", trusted_keys=[server.public_path])
    with pytest.raises(UnsignedFileError):
        DeviceRuntime(edited, trusted_keys=[server.public_path])
    module = next(iter(layers))
    blob = make_blob_bytes(path, modules={module: (layers[module].out_features, layers[module].in_features)}, rank=1)
    signed_blob = sign_bytes(blob, server_key, user_id="alice", base_content=rt.base.content_digest, now=NOW)
    rt.load_user(signed_blob, user_id="alice")
    other = DeviceRuntime(edited, trust=TrustPolicy(trusted_keys=keyring([server.public_path]), allow_unsigned=True))
    with pytest.raises(BaseMismatchError, match="edited or is another quantization"):
        other.load_user(signed_blob, user_id="alice")


def test_signed_layout_golden(tiny_base):
    """The signed envelope's bytes are fixed by docs/FORMAT.md: magic, version, flags, key id, claims length,
    canonical claims, signature (Ed25519 is deterministic), then the payload (here AES-256-GCM with a fixed nonce)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    body = make_blob_bytes(tiny_base, adapter_id="golden")
    claims = {"format": "lowra-adapter", "format_version": 2, "subject": "golden", "user_id": "alice",
              "device_id": None, "base_fingerprint": "sha256:" + "0" * 64, "base_content": None,
              "issued_at": "2026-11-29T12:00:00+00:00", "expires_at": None, "sequence": 1}
    data = signed.seal(body, claims, key, aes_key=bytes(range(32, 64)), nonce=bytes(12))
    magic, version, flags, kid, claims_len, payload_len = struct.unpack_from("<8sHH16sIQ", data)
    assert (magic, version, flags, payload_len) == (b"LOWRA\x00SG", 1, 1, len(body) + 16)
    assert len(data) == 40 + claims_len + payload_len + 64
    assert kid.hex() == hashlib.sha256(key.public_key().public_bytes_raw()).hexdigest()[:32]
    assert data[40:41] == b"{" and data[40 + claims_len - 1 : 40 + claims_len] == b"}"
    assert hashlib.sha256(body).hexdigest()[:16] == GOLDEN_BODY
    assert hashlib.sha256(data).hexdigest()[:16] == GOLDEN_SIGNED


GOLDEN_BODY = "6625b6c2ffd80e28"
GOLDEN_SIGNED = "141389c74acf1a9e"
