"""The signed envelope (adapter format v2, signed base files): Ed25519 over the exact bytes, optional AES-256-GCM.

A signed file wraps an inner lowra file (a v1 adapter blob or a quantized base, unchanged) so that a device can
check who made it *before parsing any JSON* of it. Layout, all integers little-endian:

    offset  size  field
    0       8     magic ``b"LOWRA\x00SG"`` (a plain safetensors file starts with its header length instead)
    8       2     envelope version (1)
    10      2     flags: bit 0 = the payload is encrypted; other bits must be 0
    12      16    key id: the first 16 bytes of sha256(raw 32-byte Ed25519 public key)
    28      4     C, the length of the claims (1 .. MAX_CLAIMS_BYTES)
    32      8     P, the length of the payload
    40      C     claims: canonical JSON (sorted keys, no spaces, ASCII), see CLAIM_KEYS
    40+C    P     payload: the inner file, or its AES-256-GCM ciphertext (16-byte tag last)
    40+C+P  64    Ed25519 signature over bytes [0, 40+C+P): everything before it; the file ends here

The signature covers every byte but itself, so nothing can be appended, cut or changed; the lengths in the fixed
prefix must add up to the file's size exactly, so a padded or cut file is refused before anything is hashed. The
signed bytes are one contiguous range, verified in place (no copy of the payload). The reader checks the magic,
the lengths and the signature, and only then parses the claims (:func:`open_envelope`). Claims bind the
payload to its issuer's intent: which format and version, which adapter, user and device, which base, when it was
issued and until when it is valid, and a per-user monotonic ``sequence`` that refuses replays and rollbacks.

Encryption (optional, per user): the payload is sealed with AES-256-GCM under a 32-byte key the app gets from its
own key store; ``claims["encryption"]`` holds the 12-byte nonce and a key check value, so a wrong key and a
tampered payload are told apart. The associated data is the signed prefix, so a ciphertext cannot be moved under
other claims. Decryption happens in memory; nothing decrypted is written anywhere.

This module defines the bytes; :mod:`lowra.device_runtime.trust` applies an app's policy (pinned keys,
revocations, expected user, clock, replay store) to what it returns.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from lowra.device_runtime.errors import (
    BlobContentError,
    BlobTruncatedError,
    DecryptionKeyError,
    ForgedSignatureError,
    PayloadTamperedError,
    SigningUnavailableError,
    UnsupportedFormatError,
)
from lowra.device_runtime.formats.container import strict_json

MAGIC = b"LOWRA\x00SG"
ENVELOPE_VERSION = 1
FLAG_ENCRYPTED = 0x1
KEY_ID_BYTES = 16
SIGNATURE_BYTES = 64
PREFIX = struct.Struct("<8sHH16sIQ")  # magic, version, flags, key id, claims length, payload length
MAX_CLAIMS_BYTES = 64 * 1024
NONCE_BYTES = 12
TAG_BYTES = 16
AES_KEY_BYTES = 32
ALGORITHM = "Ed25519"
CIPHER = "AES-256-GCM"

# Every claim a signed file carries (values may be null where noted).
CLAIM_KEYS = (
    "alg",  # "Ed25519"
    "format",  # the inner file's format: "lowra-adapter" or "lowra-base"
    "format_version",  # the signed format's version: 2
    "subject",  # adapter id (adapter) or the quantized fingerprint (base)
    "user_id",  # the user the adapter belongs to (null for a base)
    "device_id",  # the one device it may run on, or null for any device of that user
    "base_fingerprint",  # adapter: the base binding of the inner blob; base: its own quantized fingerprint
    "base_content",  # adapter: digest of every tensor of the base (dense ones too), or null; base: the same, its own
    "issued_at",  # ISO-8601 UTC
    "expires_at",  # ISO-8601 UTC or null (no expiry)
    "sequence",  # integer >= 1, strictly increasing per (user, adapter) across re-issues: no replay or rollback
    "body_sha256",  # hex sha256 of the inner (plaintext) file
    "body_bytes",  # its length
    "encryption",  # null, or {"alg": "AES-256-GCM", "nonce": hex, "key_check": hex}
)
SIGNED_VERSION = 2


def is_signed(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts like a signed envelope (cheap: the magic only)."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def key_id(public_key_raw: bytes) -> str:
    """The hex key id of a raw 32-byte Ed25519 public key (what files and key lists name)."""
    if len(public_key_raw) != 32:
        raise BlobContentError(f"an Ed25519 public key is 32 raw bytes, got {len(public_key_raw)}")
    return hashlib.sha256(public_key_raw).digest()[:KEY_ID_BYTES].hex()


def key_check(aes_key: bytes) -> str:
    """A value that identifies an AES key without revealing it (HMAC-SHA256 with a fixed label, 8 bytes)."""
    return hmac.new(aes_key, b"lowra key check v1", hashlib.sha256).digest()[:8].hex()


def canonical_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _crypto() -> Any:
    try:
        from cryptography.exceptions import InvalidSignature, InvalidTag
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:  # the runtime's optional extra
        raise SigningUnavailableError(
            f"signed or encrypted files need the `cryptography` package ({exc}); install lowra[runtime]"
        ) from exc
    return ed25519, AESGCM, InvalidSignature, InvalidTag


@dataclass(frozen=True)
class Envelope:
    """A signed file whose signature checked out against ``public_key`` (claims parsed, payload not yet opened)."""

    key_id: str
    claims: dict[str, Any]
    payload: bytes | memoryview  # the inner file, or its ciphertext when ``encrypted``
    encrypted: bool
    signed_prefix: bytes


def seal(body: bytes, claims: Mapping[str, Any], private_key: Any, aes_key: bytes | None = None,
         nonce: bytes | None = None) -> bytes:
    """Sign (and, with ``aes_key``, encrypt) ``body`` under ``claims``; the caller supplies every claim in
    CLAIM_KEYS except alg, body_sha256, body_bytes and encryption, which are derived here."""
    ed25519, AESGCM, _, _ = _crypto()
    if not isinstance(private_key, ed25519.Ed25519PrivateKey):
        raise BlobContentError("signing needs an Ed25519 private key (see `lowra keys new`)")
    from cryptography.hazmat.primitives import serialization

    raw_public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    full = dict(claims)
    full.update(alg=ALGORITHM, body_sha256=hashlib.sha256(body).hexdigest(), body_bytes=len(body), encryption=None)
    flags = 0
    if aes_key is not None:
        if len(aes_key) != AES_KEY_BYTES:
            raise BlobContentError(f"an AES-256 key is {AES_KEY_BYTES} bytes, got {len(aes_key)}")
        import os

        nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
        full["encryption"] = {"alg": CIPHER, "nonce": nonce.hex(), "key_check": key_check(aes_key)}
        flags |= FLAG_ENCRYPTED
    missing = [k for k in CLAIM_KEYS if k not in full]
    extra = sorted(set(full) - set(CLAIM_KEYS))
    if missing or extra:
        raise BlobContentError(f"claims lack {missing} / have unknown {extra}; expected exactly {list(CLAIM_KEYS)}")
    claims_bytes = canonical_json(full)
    if len(claims_bytes) > MAX_CLAIMS_BYTES:
        raise BlobContentError(f"claims take {len(claims_bytes)} bytes; at most {MAX_CLAIMS_BYTES}")
    payload_len = len(body) + (TAG_BYTES if aes_key is not None else 0)
    prefix = PREFIX.pack(MAGIC, ENVELOPE_VERSION, flags, bytes.fromhex(key_id(raw_public)), len(claims_bytes),
                         payload_len)
    prefix += claims_bytes
    payload = AESGCM(aes_key).encrypt(nonce, body, prefix) if aes_key is not None else body
    signed = prefix + payload
    return signed + private_key.sign(signed)


def read_envelope_key_id(data: bytes | memoryview, what: str) -> str:
    """The key id a signed file names, from its fixed-size prefix (nothing else is read)."""
    return _prefix(data, what)[2]


def _prefix(data: bytes | memoryview, what: str) -> tuple[int, int, str, int, int]:
    """(version, flags, key id, claims length, payload length), the lengths checked against the file's size."""
    if len(data) < PREFIX.size + SIGNATURE_BYTES:
        raise BlobTruncatedError(f"{what}: {len(data)} bytes is too short for a signed lowra file")
    magic, version, flags, raw_key, claims_len, payload_len = PREFIX.unpack_from(bytes(data[: PREFIX.size]))
    if magic != MAGIC:
        raise UnsupportedFormatError(f"{what}: not a signed lowra file (magic {magic!r}, expected {MAGIC!r})")
    if version != ENVELOPE_VERSION:
        raise UnsupportedFormatError(
            f"{what}: signed envelope version {version}; this runtime reads version {ENVELOPE_VERSION}. Upgrade lowra"
        )
    if flags & ~FLAG_ENCRYPTED:
        raise BlobContentError(f"{what}: unknown envelope flags {flags:#06x}; only bit 0 (encrypted) is defined")
    if not 1 <= claims_len <= MAX_CLAIMS_BYTES:
        raise BlobContentError(f"{what}: claims length {claims_len} outside 1..{MAX_CLAIMS_BYTES}")
    expected = PREFIX.size + claims_len + payload_len + SIGNATURE_BYTES
    if expected > len(data):
        raise BlobTruncatedError(f"{what}: the prefix announces {expected} bytes but the file has {len(data)}; truncated")
    if expected < len(data):
        raise BlobContentError(f"{what}: {len(data) - expected} bytes follow the signature; trailing bytes are refused")
    return version, flags, raw_key.hex(), claims_len, payload_len


def read_unverified(data: bytes | memoryview, what: str = "signed file") -> Envelope:
    """A signed file's envelope *without* checking its signature: to show what a file says about itself (``lowra
    inspect`` without keys), never to trust it. Malformed envelopes are refused exactly as :func:`open_envelope`
    refuses them: lengths, flags, canonical claims, the payload length and the encryption flag agreeing."""
    _, flags, key, claims_len, payload_len = _prefix(data, what)
    head = PREFIX.size + claims_len
    prefix = bytes(data[:head])
    payload = memoryview(data)[head : head + payload_len]
    claims = _parse_claims(prefix[PREFIX.size :], what)
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if encrypted != (claims["encryption"] is not None):
        raise BlobContentError(f"{what}: the encrypted flag and the claims' encryption entry disagree")
    expected_len = claims["body_bytes"] + (TAG_BYTES if encrypted else 0)
    if payload_len != expected_len:
        raise BlobContentError(f"{what}: payload is {payload_len} bytes, the claims say {expected_len}")
    return Envelope(key_id=key, claims=claims, payload=payload, encrypted=encrypted, signed_prefix=prefix)


def open_envelope(data: bytes | memoryview, public_key_raw: bytes, what: str = "signed file") -> Envelope:
    """Check the signature of ``data`` with ``public_key_raw`` (32 bytes), then parse the claims.

    Raises ForgedSignatureError when the bytes were not signed by that key (or were changed since), before any JSON
    is read; then the checks of :func:`read_unverified`.
    """
    ed25519, _, InvalidSignature, _ = _crypto()
    key = _prefix(data, what)[2]
    if key != key_id(public_key_raw):
        raise ForgedSignatureError(f"{what}: signed by key {key}, but the key given has id {key_id(public_key_raw)}")
    view = memoryview(data)
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key_raw).verify(bytes(view[-SIGNATURE_BYTES:]),
                                                                          view[:-SIGNATURE_BYTES])
    except InvalidSignature:
        raise ForgedSignatureError(
            f"{what}: the Ed25519 signature does not match key {key}; the file was modified after signing or "
            "forged. Re-download it"
        ) from None
    return read_unverified(data, what)


def _parse_claims(raw: bytes, what: str) -> dict[str, Any]:
    try:
        claims = strict_json(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BlobContentError(f"{what}: claims are not canonical ASCII JSON ({str(exc)[:200]})") from None
    if not isinstance(claims, dict) or sorted(claims) != sorted(CLAIM_KEYS):
        keys = sorted(claims) if isinstance(claims, dict) else type(claims).__name__
        raise BlobContentError(f"{what}: claims have keys {str(keys)[:300]}, expected {sorted(CLAIM_KEYS)}")
    if canonical_json(claims) != raw:
        raise BlobContentError(f"{what}: claims are not in canonical form (sorted keys, compact)")
    ints = {"format_version": 1, "sequence": 1, "body_bytes": 0}
    for key, low in ints.items():
        value = claims[key]
        if type(value) is not int or not low <= value < 2**53:
            raise BlobContentError(f"{what}: claim {key!r} = {str(value)[:40]} is not an integer in [{low}, 2**53)")
    for key in ("alg", "format", "subject", "issued_at", "body_sha256"):
        if not isinstance(claims[key], str):
            raise BlobContentError(f"{what}: claim {key!r} must be a string")
    for key in ("user_id", "device_id", "base_fingerprint", "base_content", "expires_at"):
        if claims[key] is not None and not isinstance(claims[key], str):
            raise BlobContentError(f"{what}: claim {key!r} must be a string or null")
    if claims["alg"] != ALGORITHM:
        raise BlobContentError(f"{what}: signature algorithm {claims['alg']!r}, expected {ALGORITHM!r}")
    enc = claims["encryption"]
    if enc is not None and (not isinstance(enc, dict) or sorted(enc) != ["alg", "key_check", "nonce"]
                            or enc.get("alg") != CIPHER or not _is_hex(enc.get("nonce"), NONCE_BYTES)
                            or not _is_hex(enc.get("key_check"), 8)):
        raise BlobContentError(f"{what}: claim 'encryption' must be {{alg: {CIPHER!r}, nonce: 12-byte hex, key_check}}")
    return claims


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _is_hex(value: Any, n_bytes: int) -> bool:
    """Exactly ``2 * n_bytes`` hex digits (``bytes.fromhex`` alone would also take spaces)."""
    return isinstance(value, str) and len(value) == 2 * n_bytes and all(c in _HEX_DIGITS for c in value)


def decrypt_payload(envelope: Envelope, aes_key: bytes | None, what: str = "signed file") -> bytes | memoryview:
    """The inner file's bytes: a view of the payload itself (no copy), or its decryption with ``aes_key`` (in
    memory only).

    A key whose check value differs is a DecryptionKeyError; a payload that fails authentication under the right key
    is a PayloadTamperedError. The plaintext must hash to the signed ``body_sha256``.
    """
    if not envelope.encrypted:
        body: bytes | memoryview = envelope.payload
    else:
        _, AESGCM, _, InvalidTag = _crypto()
        enc = envelope.claims["encryption"]
        if aes_key is None:
            raise DecryptionKeyError(f"{what} is encrypted; pass the user's 32-byte key (decryption_key=...)")
        if len(aes_key) != AES_KEY_BYTES or not hmac.compare_digest(key_check(aes_key), enc["key_check"]):
            raise DecryptionKeyError(
                f"{what}: the decryption key does not match the one it was sealed with (key check "
                f"{enc['key_check']}); fetch this user's key from the app's key store"
            )
        try:
            body = AESGCM(aes_key).decrypt(bytes.fromhex(enc["nonce"]), envelope.payload, envelope.signed_prefix)
        except InvalidTag:
            raise PayloadTamperedError(
                f"{what}: the encrypted payload fails authentication under the right key; it was tampered with"
            ) from None
    if hashlib.sha256(body).hexdigest() != envelope.claims["body_sha256"]:
        raise PayloadTamperedError(f"{what}: the payload does not hash to the signed body_sha256")
    return body


# ----------------------------------------------------------------------------------------------- revocation list
REVOCATIONS_FORMAT = "lowra-revocations"
REVOCATIONS_VERSION = 1


def encode_revocations(key_ids: Iterable[str]) -> bytes:
    """The revocation list file: ``{"format": "lowra-revocations", "format_version": 1, "revoked": [key ids]}``."""
    ids = sorted({k.lower() if isinstance(k, str) else k for k in key_ids})
    bad = [k for k in ids if not _is_hex(k, KEY_ID_BYTES)]
    if bad:
        raise BlobContentError(f"key ids {bad[:3]} are not {KEY_ID_BYTES}-byte hex ids")
    return json.dumps({"format": REVOCATIONS_FORMAT, "format_version": REVOCATIONS_VERSION, "revoked": ids},
                      indent=1).encode() + b"\n"


def decode_revocations(data: bytes, what: str = "revocation list") -> frozenset[str]:
    try:
        doc = strict_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BlobContentError(f"{what} is not valid JSON ({str(exc)[:200]})") from None
    if (not isinstance(doc, dict) or doc.get("format") != REVOCATIONS_FORMAT
            or type(doc.get("format_version")) is not int or doc["format_version"] != REVOCATIONS_VERSION
            or not isinstance(doc.get("revoked"), list) or not all(_is_hex(k, KEY_ID_BYTES) for k in doc["revoked"])):
        raise BlobContentError(f"{what}: expected {{format: {REVOCATIONS_FORMAT!r}, format_version: 1, revoked: [key ids]}}")
    return frozenset(k.lower() for k in doc["revoked"])  # key ids are compared in lower case
