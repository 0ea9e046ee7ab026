"""An app's trust policy for the files it loads: pinned keys, revocations, recipients, expiry, replay, decryption.

The bytes are defined in :mod:`.formats.signed`; this module decides whether a file that parses is acceptable.
Each refusal is its own :class:`~.errors.TrustError` subclass (forged, untrusted key, revoked key, unsigned, expired,
replayed, wrong recipient, wrong decryption key, tampered payload), so an app can react to each.

Unsigned (format v1) files: accepted while the app pins no key (development and the existing tools), refused as
soon as it pins one, unless it opts in with ``allow_unsigned=True``.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from lowra.device_runtime._files import atomic_write_bytes
from lowra.device_runtime.errors import (
    BaseMismatchError,
    BlobContentError,
    ConfigError,
    ExpiredFileError,
    ReplayedFileError,
    RevokedKeyError,
    UnsignedFileError,
    UntrustedKeyError,
    WrongRecipientError,
)
from lowra.device_runtime.formats import signed
from lowra.device_runtime.formats.adapter import Blob, parse_blob, read_blob_bytes
from lowra.device_runtime.formats.constants import ADAPTER_FORMAT, BASE_FORMAT
from lowra.device_runtime.formats.quantized_base import QuantizedBase, parse_quantized_base, read_quantized_base

CLOCK_SKEW = _dt.timedelta(minutes=5)  # tolerated difference between the issuer's and the device's clocks


# The one spelling of a time in signed claims (RFC 3339; what sdk.signing writes, and what liblowra parses):
# YYYY-MM-DDTHH:MM:SS, an optional fraction of 1-6 digits, then Z or +HH:MM / -HH:MM.
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})?", re.ASCII)


def _utc(text: str, what: str) -> _dt.datetime:
    match = _TIME.fullmatch(text)
    try:
        if match is None:
            raise ValueError(text)
        value = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise BlobContentError(f"{what}: {text[:40]!r} is not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise BlobContentError(f"{what}: time {text!r} has no time zone; signed times are UTC")
    return value


def load_public_key(source: str | Path | bytes) -> bytes:
    """A raw 32-byte Ed25519 public key from raw bytes, PEM bytes, or a PEM / raw file path."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if len(data) == 32:
        return data
    signed._crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise BlobContentError(f"not an Ed25519 public key (PEM or 32 raw bytes): {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BlobContentError(f"public key is {type(key).__name__}, expected Ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SequenceStore:
    """The newest sequence accepted per (user, subject), in memory; :class:`FileSequenceStore` persists it.

    Loading the same file again (same sequence, same body) is a legitimate swap back; an older sequence is a
    rollback or replay, and the same sequence with another body is an equivocating issuer: both are refused.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(user_id: str | None, subject: str) -> str:
        return f"{user_id or ''}\x1f{subject}"

    def check_and_record(self, user_id: str | None, subject: str, sequence: int, body_sha256: str, what: str) -> None:
        key = self._key(user_id, subject)
        with self._lock:
            last = self._seen.get(key)
            if last is not None:
                if sequence < last[0]:
                    raise ReplayedFileError(
                        f"{what}: sequence {sequence} for user {user_id!r} / {subject!r} is older than the accepted "
                        f"{last[0]}; refusing a replayed or rolled-back file"
                    )
                if sequence == last[0] and body_sha256 != last[1]:
                    raise ReplayedFileError(
                        f"{what}: sequence {sequence} was already accepted for user {user_id!r} with other content; "
                        "every re-issue needs a higher sequence"
                    )
            self._seen[key] = (sequence, body_sha256)
            self._persist()

    def _persist(self) -> None:
        """Called with the lock held after every change; the in-memory store keeps nothing on disk."""


class FileSequenceStore(SequenceStore):
    """A :class:`SequenceStore` kept in a JSON file (written atomically on every change), so a restart of the app
    cannot be used to replay an old file."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self._seen = {str(k): (int(v[0]), str(v[1])) for k, v in raw.items()}
            except (ValueError, TypeError, IndexError, AttributeError) as exc:
                raise BlobContentError(f"sequence store {self.path} is corrupt ({exc}); restore it from a backup") from None

    def _persist(self) -> None:
        data = json.dumps({k: list(v) for k, v in sorted(self._seen.items())}, indent=1).encode()
        atomic_write_bytes(self.path, data, overwrite=True)


@dataclass
class TrustPolicy:
    """What an app trusts. ``trusted_keys``: key id -> raw public key (see :func:`keyring`)."""

    trusted_keys: Mapping[str, bytes] = field(default_factory=dict)
    revoked_keys: frozenset[str] = frozenset()
    allow_unsigned: bool | None = None  # None: only while no key is pinned
    device_id: str | None = None
    sequences: SequenceStore = field(default_factory=SequenceStore)
    clock: Callable[[], _dt.datetime] = lambda: _dt.datetime.now(_dt.timezone.utc)

    def __post_init__(self) -> None:
        for kid, raw in self.trusted_keys.items():
            if signed.key_id(raw) != kid:
                raise BlobContentError(f"trusted key {kid!r} is not the id of the key given for it ({signed.key_id(raw)})")
        self.revoked_keys = frozenset(self.revoked_keys)

    @property
    def unsigned_allowed(self) -> bool:
        return (not self.trusted_keys) if self.allow_unsigned is None else self.allow_unsigned

    def check_unsigned(self, what: str) -> None:
        """Refuse an unsigned (format v1) file unless this policy allows them."""
        if not self.unsigned_allowed:
            raise UnsignedFileError(
                f"{what} is not signed (format v1) and this app only accepts files signed by its pinned keys; "
                "sign it with `lowra sign` or allow unsigned input explicitly"
            )

    def verify(self, data: bytes | memoryview, what: str) -> signed.Envelope:
        """The signature alone: a revoked key, a key not pinned and a bad signature are each their own error.
        (:meth:`open` adds the claims' checks: format, recipient, time, replay, decryption.)"""
        kid = signed.read_envelope_key_id(data, what)
        if kid in self.revoked_keys:
            raise RevokedKeyError(f"{what} is signed by key {kid}, which is revoked; ask the server for a re-signed file")
        public = self.trusted_keys.get(kid)
        if public is None:
            raise UntrustedKeyError(
                f"{what} is signed by key {kid}, which this app does not trust (pinned: {sorted(self.trusted_keys)})"
            )
        return signed.open_envelope(data, public, what)

    def open(self, data: bytes | memoryview, *, fmt: str, what: str, user_id: str | None = None,
             decryption_key: bytes | None = None) -> tuple[bytes | memoryview, dict[str, Any] | None]:
        """The inner file's bytes and the verified claims (None for an accepted unsigned file)."""
        if not signed.is_signed(data):
            self.check_unsigned(what)
            return data, None
        envelope = self.verify(data, what)
        claims = envelope.claims
        if claims["format"] != fmt or claims["format_version"] != signed.SIGNED_VERSION:
            raise BlobContentError(
                f"{what}: signed claims are for {claims['format']!r} v{claims['format_version']}, expected {fmt!r} "
                f"v{signed.SIGNED_VERSION}"
            )
        self._check_recipient(claims, user_id, what)
        self._check_time(claims, what)
        body = signed.decrypt_payload(envelope, decryption_key, what)
        self.sequences.check_and_record(claims["user_id"], claims["subject"], claims["sequence"],
                                        claims["body_sha256"], what)
        return body, claims

    def _check_recipient(self, claims: Mapping[str, Any], user_id: str | None, what: str) -> None:
        if user_id is not None and claims["user_id"] != user_id:
            raise WrongRecipientError(
                f"{what} belongs to user {claims['user_id']!r}, not to {user_id!r}; refusing a swapped file"
            )
        if claims["device_id"] is not None and claims["device_id"] != self.device_id:
            raise WrongRecipientError(
                f"{what} is bound to device {claims['device_id']!r}; this device is {self.device_id!r}"
            )

    def _check_time(self, claims: Mapping[str, Any], what: str) -> None:
        now = self.clock()
        issued = _utc(claims["issued_at"], what)
        if issued > now + CLOCK_SKEW:  # skew added to now: a time near year 1 cannot overflow
            raise ExpiredFileError(f"{what} claims to be issued at {claims['issued_at']}, in the future ({now:%Y-%m-%dT%H:%M:%SZ})")
        if claims["expires_at"] is not None and _utc(claims["expires_at"], what) < now - CLOCK_SKEW:
            raise ExpiredFileError(f"{what} expired at {claims['expires_at']}; ask the server for a fresh file")


def keyring(public_keys: Iterable[str | Path | bytes]) -> dict[str, bytes]:
    """``{key id: raw public key}`` for pinned keys given as files (PEM or raw) or bytes."""
    out: dict[str, bytes] = {}
    for source in public_keys:
        raw = load_public_key(source)
        out[signed.key_id(raw)] = raw
    return out


def open_blob(source: str | Path | bytes | bytearray, policy: TrustPolicy, *, user_id: str | None = None,
              decryption_key: bytes | None = None) -> Blob:
    """Read, authenticate and parse a user's blob (a path or the file's bytes) under ``policy``.

    A signed blob's claims must describe the blob inside (its adapter id and base binding); they are attached to
    the returned :class:`Blob` as ``claims`` so an engine can also check ``base_content`` against its base.
    """
    data, what = read_blob_bytes(source)
    body, claims = policy.open(data, fmt=ADAPTER_FORMAT, what=what, user_id=user_id, decryption_key=decryption_key)
    blob = parse_blob(body, what)
    if claims is not None:
        if claims["subject"] != blob.adapter_id or claims["base_fingerprint"] != blob.base_fingerprint:
            raise BlobContentError(
                f"{what}: the signed claims name adapter {claims['subject']!r} on base {str(claims['base_fingerprint'])[:23]}"
                f"..., the blob inside is {blob.adapter_id!r} on {blob.base_fingerprint[:23]}..."
            )
        blob.claims = claims
    return blob


def check_base_content(blob: Blob, content: str | None, where: str) -> None:
    """Refuse a signed blob whose ``base_content`` claim names another base content than ``content`` (the digest of
    every tensor of the base, dense ones included, where the engine knows it)."""
    claimed = (blob.claims or {}).get("base_content")
    if claimed is None:
        return
    if content is None:
        raise BaseMismatchError(
            f"adapter {blob.adapter_id!r} is signed for base content {str(claimed)[:16]}..., but {where} cannot prove "
            "its content (load the signed quantized base file it was made for)"
        )
    if claimed != content:
        raise BaseMismatchError(
            f"adapter {blob.adapter_id!r} is signed for base content {str(claimed)[:16]}..., {where} has "
            f"{content[:16]}...: the base was edited or is another quantization. Load the base it was made for"
        )


def open_quantized_base(path: str | Path, policy: TrustPolicy) -> QuantizedBase:
    """A quantized base file under ``policy``: a signed one is authenticated before any of it is parsed (and
    its claims must name its own fingerprint and content); an unsigned one is memory-mapped as before, where the
    policy allows unsigned files."""
    path = Path(path)
    what = f"quantized base {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{what} does not exist (expected a file written by `lowra quantize-base`)")
    with open(path, "rb") as fh:
        if not signed.is_signed(fh.read(len(signed.MAGIC))):
            policy.check_unsigned(what)
            return read_quantized_base(path)
    body, claims = policy.open(path.read_bytes(), fmt=BASE_FORMAT, what=what)
    base = parse_quantized_base(body, what)
    if (claims["subject"] != base.fingerprint or claims["base_fingerprint"] != base.fingerprint
            or claims["base_content"] != base.metadata["payload_sha256"]):
        raise BlobContentError(f"{what}: the signed claims describe another base than the file inside")
    base.claims = claims
    return base


def make_policy(trust: TrustPolicy | None, trusted_keys: Iterable[str | Path | bytes] | None) -> TrustPolicy:
    """The policy an engine uses: ``trust`` as given, or one pinning ``trusted_keys`` (public key files or raw
    bytes); with neither, the development default (no key pinned, unsigned files accepted)."""
    if trust is not None and trusted_keys is not None:
        raise ConfigError("pass trust=TrustPolicy(...) or trusted_keys=[...], not both")
    return trust if trust is not None else TrustPolicy(trusted_keys=keyring(trusted_keys or ()))
