"""``lowra keys`` and ``lowra sign``: the server's signing keys, per-user encryption keys, and signing files.

The work is done by :mod:`lowra.sdk.signing` (no torch); these functions turn arguments into its calls and print
one result line per output. :func:`signature_claims` is shared with ``lowra compress --sign-key``.
"""
from __future__ import annotations

import argparse
from typing import Any

from lowra.device_runtime.errors import ConfigError

CLAIM_FLAGS = {"user_id": "--user-id", "device_id": "--device-id", "expires_in": "--expires-in",
               "sequence": "--sequence", "encrypt_key_file": "--encrypt-key-file"}


def signature_claims(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`lowra.sdk.signing.sign_bytes` that the claim flags set."""
    from lowra.sdk.signing import read_encryption_key

    return {
        "user_id": args.user_id,
        "device_id": args.device_id,
        "expires_in": args.expires_in,
        "sequence": args.sequence,
        "encryption_key": read_encryption_key(args.encrypt_key_file) if args.encrypt_key_file else None,
    }


def refuse_claims_without_key(args: argparse.Namespace) -> None:
    """Claim flags without a signing key would be silently dropped: refuse them instead."""
    given = [flag for dest, flag in CLAIM_FLAGS.items() if getattr(args, dest) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only apply to a signed blob; add --sign-key KEY.pem or drop them")


def cmd_sign(args: argparse.Namespace) -> int:
    from lowra.device_runtime.formats import signed
    from lowra.sdk.signing import sign_file

    claims = signature_claims(args)
    out = sign_file(args.file, args.out, args.key, overwrite=args.force, quantized_base=args.quantized_base,
                    **claims)
    data = out.read_bytes()
    encrypted = " and encrypted" if claims["encryption_key"] is not None else ""
    print(f"signed{encrypted} {args.file} -> {out} ({len(data)} bytes) with key "
          f"{signed.read_envelope_key_id(data, str(out))} ({args.key})")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    return KEY_ACTIONS[args.keys_command](args)


def _keys_new(args: argparse.Namespace) -> int:
    from lowra.sdk.signing import new_key

    info = new_key(args.dir, args.name)
    print(f"key id {info.key_id}")
    print(f"private key {info.private_path} (mode 0600: keep it on the signing server only)")
    print(f"public key  {info.public_path} (pin it in apps)")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from lowra.sdk.signing import list_keys

    keys = list_keys(args.dir)
    if not keys:
        print(f"no keys in {args.dir} (make one with `lowra keys new`)")
        return 0
    width = max(len("name"), *(len(k.name) for k in keys))
    print(f"{'name':{width}s}  {'key id':32s}  private  revoked")
    for k in keys:
        print(f"{k.name:{width}s}  {k.key_id}  {'yes' if k.private_path else 'no':7s}  {'yes' if k.revoked else 'no'}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from lowra.sdk.signing import revoke

    path = revoke(args.dir, args.key_id)
    print(f"revoked {args.key_id}: {path} updated; ship it to apps (TrustPolicy(revoked_keys=...))")
    return 0


def _keys_new_encryption_key(args: argparse.Namespace) -> int:
    from lowra.sdk.signing import write_encryption_key

    path = write_encryption_key(args.out, overwrite=args.force)
    print(f"wrote a 32-byte AES-256 key to {path} (mode 0600); give it to the user's app, never beside the blob")
    return 0


KEY_ACTIONS = {
    "new": _keys_new,
    "list": _keys_list,
    "revoke": _keys_revoke,
    "new-encryption-key": _keys_new_encryption_key,
}
