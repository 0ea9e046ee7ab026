"""Server-side keys and signatures: make Ed25519 keys, revoke them, sign (and optionally encrypt) lowra files.

The bytes are defined in :mod:`lowra.device_runtime.formats.signed`; the device checks them with
:class:`lowra.device_runtime.trust.TrustPolicy`. Keys are standard PEM files (private: PKCS#8, written 0600;
public: SubjectPublicKeyInfo), named ``<name>.key.pem`` / ``<name>.pub.pem`` in a key folder, with
``revocations.json`` beside them. Rotation: make a new key, pin both on devices, sign with the new one, then revoke
the old one.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowra.device_runtime._files import atomic_write_bytes, private_file
from lowra.device_runtime.errors import (
    ConfigError,
    LowraError,
    OutputExistsError,
)
from lowra.device_runtime.formats import signed
from lowra.device_runtime.formats.adapter import parse_blob
from lowra.device_runtime.formats.constants import ADAPTER_FORMAT, BASE_FORMAT
from lowra.device_runtime.formats.quantized_base import parse_quantized_base
from lowra.device_runtime.trust import TrustPolicy, keyring, load_public_key

PRIVATE_SUFFIX = ".key.pem"
PUBLIC_SUFFIX = ".pub.pem"
REVOCATIONS_FILE = "revocations.json"


@dataclass(frozen=True)
class KeyInfo:
    name: str
    key_id: str
    public_path: Path
    private_path: Path | None
    revoked: bool


def _serialization() -> Any:
    signed._crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def _check_name(name: str) -> None:
    if not name or not name.isprintable() or any(c in name for c in "/\\\0") or name in (".", "..") or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name (printable, no path separators)")


def new_key(folder: str | Path, name: str) -> KeyInfo:
    """A fresh Ed25519 key pair in ``folder`` (refuses to overwrite an existing key of that name)."""
    serialization, ed25519 = _serialization()
    _check_name(name)
    folder = Path(folder)
    private = ed25519.Ed25519PrivateKey.generate()
    pem_private = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    pem_public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path, public_path = folder / f"{name}{PRIVATE_SUFFIX}", folder / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):  # checked up front so a refusal leaves no half of a pair behind
        if path.exists():
            raise OutputExistsError(f"{path} already exists; choose another key name (keys are never overwritten)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new key folder is its owner's only
    with private_file(private_path) as tmp:  # readable by its owner only
        tmp.write_bytes(pem_private)
    atomic_write_bytes(public_path, pem_public)
    return KeyInfo(name, signed.key_id(load_public_key(pem_public)), public_path, private_path, False)


def load_private_key(path: str | Path) -> Any:
    serialization, ed25519 = _serialization()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"private key {path} does not exist (make one with `lowra keys new`)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; lowra signs with Ed25519 keys")
    return key


def revocations(folder: str | Path) -> frozenset[str]:
    path = Path(folder) / REVOCATIONS_FILE
    return signed.decode_revocations(path.read_bytes(), str(path)) if path.is_file() else frozenset()


def list_keys(folder: str | Path) -> list[KeyInfo]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"key folder {folder} does not exist")
    revoked = revocations(folder)
    out = []
    for public in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
        name = public.name[: -len(PUBLIC_SUFFIX)]
        kid = signed.key_id(load_public_key(public))
        private = folder / f"{name}{PRIVATE_SUFFIX}"
        out.append(KeyInfo(name, kid, public, private if private.is_file() else None, kid in revoked))
    return out


def revoke(folder: str | Path, key_id: str) -> Path:
    """Add ``key_id`` to the folder's revocation list (ship that list to devices: ``TrustPolicy(revoked_keys=...)``)."""
    current = revocations(folder)
    known = {k.key_id for k in list_keys(folder)}
    if key_id not in known and key_id not in current:
        raise ConfigError(f"no key with id {key_id} in {folder} (see `lowra keys list`)")
    return atomic_write_bytes(Path(folder) / REVOCATIONS_FILE, signed.encode_revocations(current | {key_id}),
                              overwrite=True)


def _iso(value: _dt.datetime) -> str:
    return value.astimezone(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sign_bytes(body: bytes, private_key: Any, *, user_id: str | None = None, device_id: str | None = None,
               expires_in: _dt.timedelta | None = None, sequence: int | None = None, base_content: str | None = None,
               encryption_key: bytes | None = None, now: _dt.datetime | None = None) -> bytes:
    """Sign an adapter blob or a quantized base file (its exact bytes) into the signed envelope.

    Claims come from the file itself (format, adapter id or base fingerprint, base binding) plus the arguments.
    ``sequence`` defaults to the current Unix time in milliseconds, which increases with every re-issue; pass the
    registry's version number instead where one exists. ``encryption_key`` (32 bytes) seals the body for one user.
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    fmt, subject, fingerprint, content = _describe(body)
    if fmt == ADAPTER_FORMAT and not user_id:
        raise ConfigError("signing an adapter needs the user it belongs to (user_id / --user-id)")
    if fmt == BASE_FORMAT and encryption_key is not None:
        raise ConfigError("a quantized base is shared by every user and is signed, not encrypted; encryption keys "
                          "are per user, for adapter blobs")
    claims = {
        "format": fmt,
        "format_version": signed.SIGNED_VERSION,
        "subject": subject,
        "user_id": user_id,
        "device_id": device_id,
        "base_fingerprint": fingerprint,
        "base_content": base_content if fmt == ADAPTER_FORMAT else content,
        "issued_at": _iso(now),
        "expires_at": _iso(now + expires_in) if expires_in is not None else None,
        "sequence": int(sequence if sequence is not None else time.time_ns() // 1_000_000),
    }
    return signed.seal(body, claims, private_key, aes_key=encryption_key)


def _describe(body: bytes) -> tuple[str, str, str, str | None]:
    if signed.is_signed(body):
        raise ConfigError("the file is signed already; sign the unsigned original")
    try:
        blob = parse_blob(body, "file to sign")
        return ADAPTER_FORMAT, blob.adapter_id, blob.base_fingerprint, None
    except LowraError as exc:
        adapter_error = exc
    try:
        base = parse_quantized_base(body, "file to sign")
    except LowraError:
        raise ConfigError(f"only lowra adapter blobs and quantized base files can be signed ({adapter_error})") from None
    return BASE_FORMAT, base.fingerprint, base.fingerprint, str(base.metadata["payload_sha256"])


def adapter_base_content(body: bytes, quantized_base: str | Path) -> str:
    """The ``base_content`` claim for the adapter blob ``body``: the payload digest (every tensor, dense ones too) of
    the unsigned quantized base file it was compressed against. A base the adapter is not bound to is refused, so a
    signature never promises an adapter for a base it cannot run on."""
    from lowra.device_runtime.runtime import BaseWeights

    if signed.is_signed(body):
        raise ConfigError("the file is signed already; sign the unsigned original")
    try:
        blob = parse_blob(body, "adapter to sign")
    except LowraError as exc:
        raise ConfigError(f"--quantized-base binds an adapter blob to its base; this file is not one ({exc})") from None
    base = BaseWeights(quantized_base)
    if base.content_digest is None:
        raise ConfigError(f"{quantized_base} is a model folder; base content is recorded for quantized base files only")
    if base.fingerprint([m.name for m in blob.modules]) != blob.base_fingerprint:
        raise ConfigError(
            f"adapter {blob.adapter_id!r} was compressed against another base than {quantized_base}; pass the "
            "quantized base it was trained and compressed on"
        )
    return base.content_digest


def sign_file(path: str | Path, out: str | Path, private_key_path: str | Path, overwrite: bool = False,
              quantized_base: str | Path | None = None, **claims: Any) -> Path:
    """Sign the file at ``path`` into ``out`` (atomically); ``claims`` as for :func:`sign_bytes`. With
    ``quantized_base``, an adapter's ``base_content`` claim names that base (:func:`adapter_base_content`)."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    if out.exists() and not overwrite:  # before any work: a refusal writes nothing
        raise OutputExistsError(f"{out} already exists; pass overwrite=True (CLI: --force) to replace it")
    private_key = load_private_key(private_key_path)
    body = path.read_bytes()
    if quantized_base is not None:
        claims["base_content"] = adapter_base_content(body, quantized_base)
    return atomic_write_bytes(out, sign_bytes(body, private_key, **claims), overwrite=overwrite)


def new_encryption_key() -> bytes:
    """A random 32-byte AES-256 key for one user (store it in the app's key store, never beside the blob)."""
    return os.urandom(signed.AES_KEY_BYTES)


def write_encryption_key(path: str | Path, overwrite: bool = False) -> Path:
    """A new user key (:func:`new_encryption_key`) in a file readable by its owner only (0600)."""
    with private_file(path, overwrite) as tmp:
        tmp.write_bytes(new_encryption_key())
    return Path(path)


def read_encryption_key(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"encryption key file {path} does not exist (make one with `lowra keys new-encryption-key`)")
    key = path.read_bytes()
    if len(key) != signed.AES_KEY_BYTES:
        raise ConfigError(f"{path} holds {len(key)} bytes; an AES-256 key file holds exactly {signed.AES_KEY_BYTES}")
    return key


# ------------------------------------------------------------------------------------------ reading signed files
@dataclass(frozen=True)
class TrustedKeys:
    """Public keys to verify with, and the key ids revoked beside them (what ``--trust`` names)."""

    keys: dict[str, bytes]
    names: dict[str, str]  # key id -> the key's name or file, for messages
    revoked: frozenset[str]

    def policy(self) -> TrustPolicy:
        """A device policy pinning these keys (signature checks: ``policy().verify(data, what)``)."""
        return TrustPolicy(trusted_keys=self.keys, revoked_keys=self.revoked)


def trusted_keys(source: str | Path) -> TrustedKeys:
    """The public keys of a key folder (every ``*.pub.pem``, with its ``revocations.json``) or of one public key
    file."""
    source = Path(source)
    if source.is_dir():
        infos = list_keys(source)
        if not infos:
            raise ConfigError(f"key folder {source} holds no *{PUBLIC_SUFFIX} file to verify with")
        return TrustedKeys(keyring(k.public_path for k in infos), {k.key_id: k.name for k in infos},
                           revocations(source))
    if not source.is_file():
        raise ConfigError(f"{source} is neither a key folder nor a public key file")
    keys = keyring([source])
    return TrustedKeys(keys, {kid: source.name for kid in keys}, frozenset())
