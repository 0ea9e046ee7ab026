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
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from lowra.device_runtime._files import atomic_write_bytes
from lowra.device_runtime.errors import (
    BlobContentError,
    ExpiredFileError,
    ReplayedFileError,
    RevokedKeyError,
    UnsignedFileError,
    UntrustedKeyError,
    WrongRecipientError,
)
from lowra.device_runtime.formats import signed

CLOCK_SKEW = _dt.timedelta(minutes=5)  # tolerated difference between the issuer's and the device's clocks


def _utc(text: str, what: str) -> _dt.datetime:
    try:
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

    def open(self, data: bytes | memoryview, *, fmt: str, what: str, user_id: str | None = None,
             decryption_key: bytes | None = None) -> tuple[bytes | memoryview, dict[str, Any] | None]:
        """The inner file's bytes and the verified claims (None for an accepted unsigned file)."""
        if not signed.is_signed(data):
            if not self.unsigned_allowed:
                raise UnsignedFileError(
                    f"{what} is not signed (format v1) and this app only accepts files signed by its pinned keys; "
                    "sign it with `lowra sign` or allow unsigned input explicitly"
                )
            return data, None
        kid = signed.read_envelope_key_id(data, what)
        if kid in self.revoked_keys:
            raise RevokedKeyError(f"{what} is signed by key {kid}, which is revoked; ask the server for a re-signed file")
        public = self.trusted_keys.get(kid)
        if public is None:
            raise UntrustedKeyError(
                f"{what} is signed by key {kid}, which this app does not trust (pinned: {sorted(self.trusted_keys)})"
            )
        envelope = signed.open_envelope(data, public, what)
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
        if issued - CLOCK_SKEW > now:
            raise ExpiredFileError(f"{what} claims to be issued at {claims['issued_at']}, in the future ({now:%Y-%m-%dT%H:%M:%SZ})")
        if claims["expires_at"] is not None and _utc(claims["expires_at"], what) + CLOCK_SKEW < now:
            raise ExpiredFileError(f"{what} expired at {claims['expires_at']}; ask the server for a fresh file")


def keyring(public_keys: Iterable[str | Path | bytes]) -> dict[str, bytes]:
    """``{key id: raw public key}`` for pinned keys given as files (PEM or raw) or bytes."""
    out: dict[str, bytes] = {}
    for source in public_keys:
        raw = load_public_key(source)
        out[signed.key_id(raw)] = raw
    return out
