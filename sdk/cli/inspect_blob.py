"""``lowra inspect``: what a blob (or a quantized base) holds, and for a signed one who signed it, what it claims, and
whether it verifies.

It runs on the numpy-only device side (never torch: it answers in a fraction of a second). A signed file's claims
are shown whether or not a key is given, marked "not verified" without one; ``--trust`` verifies the signature
first and exits 2 when it does not hold. An encrypted blob's content is never shown: only the envelope, which is
not encrypted (docs/SECURITY.md).
"""
from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any

from lowra.device_runtime.errors import UnsignedFileError
from lowra.device_runtime.formats import signed
from lowra.device_runtime.formats.adapter import Blob, parse_blob, read_blob_bytes
from lowra.device_runtime.formats.constants import ADAPTER_FORMAT, BASE_FORMAT, CODEBOOK_FORMAT_TEXT
from lowra.device_runtime.formats.quantized_base import (
    LIMITS,
    QuantizedBase,
    parse_quantized_base,
    read_quantized_base,
)


def cmd_inspect(args: argparse.Namespace) -> int:
    if _is_quantized_base(Path(args.blob)):
        if args.trust is not None:
            raise UnsignedFileError(f"{args.blob} is not signed (format v1): there is no signature to verify")
        base = read_quantized_base(args.blob)  # every check of the device's reader, memory-mapped
        if args.json:
            print(json.dumps({"signed": None, "base": _base_json(base)}, indent=2))
        else:
            _print_base(base, f"{args.blob}: ", "  ")
        return 0
    data, what = read_blob_bytes(args.blob)
    envelope, verified_by = _envelope(data, what, args.trust)
    base = None
    if envelope is None:
        blob = parse_blob(data, what)
    elif envelope.encrypted or envelope.claims["format"] not in (ADAPTER_FORMAT, BASE_FORMAT):
        blob = None  # an encrypted body needs the user's key
    elif envelope.claims["format"] == BASE_FORMAT:
        blob, base = None, parse_quantized_base(signed.decrypt_payload(envelope, None, what), what)
    else:
        blob = parse_blob(signed.decrypt_payload(envelope, None, what), what)
    if args.json:
        out = _as_json(envelope, verified_by, blob, len(data), args.modules)
        if base is not None:
            out["base"] = _base_json(base)
        print(json.dumps(out, indent=2))
        return 0
    if envelope is None:
        _print_blob(blob, f"{args.blob}: ", "  ", args.modules)
        return 0
    _print_envelope(args.blob, envelope, verified_by, len(data))
    if envelope.encrypted:
        print("  inner file        not shown: encrypted (its metadata, modules and bits need the user's key)")
    elif base is not None:
        _print_base(base, "  inner file: ", "    ")
    elif blob is None:
        print(f"  inner file        {envelope.claims['format']}, {envelope.claims['body_bytes']} bytes")
    else:
        _print_blob(blob, "  inner file: ", "    ", args.modules)
        print(f"  signed size       {len(data)} bytes = {8.0 * len(data) / max(blob.layout.n_params, 1):.4f} "
              "effective bits/param with the envelope")
    return 0


def _is_quantized_base(path: Path) -> bool:
    """Whether ``path`` is an unsigned quantized base file (its safetensors header names the format), read from its
    header alone; anything else (a blob, a signed file, a damaged file) is left to the blob reader's checks."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8 or signed.is_signed(head):
                return False
            n = struct.unpack("<Q", head)[0]
            if n > LIMITS.max_header_bytes:
                return False
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and isinstance(header.get("__metadata__"), dict) and \
        header["__metadata__"].get("format") == BASE_FORMAT


def _base_json(base: QuantizedBase) -> dict[str, Any]:
    out: dict[str, Any] = {"format_version": base.metadata["format_version"], "fingerprint": base.fingerprint,
                           "source": base.metadata.get("source"), "layers": len(base.layers),
                           "codebook_format": base.codebook_format, "bits": base.bits_report(), "recovery": None}
    rec = base.recovery
    if rec is not None:
        out["recovery"] = {"rank": rec.rank, "scaling": rec.scaling, "modules": len(rec.factors),
                           "stored": "compressed blob" if rec.blob is not None else "float16 factors",
                           **{k: v for k, v in rec.info.items() if k != "training"}}
    return out


def _print_base(base: QuantizedBase, title: str, indent: str) -> None:
    r = base.bits_report()
    print(f"{title}lowra quantized base v{base.metadata['format_version']} (checksum and fingerprint ok)")
    print(f"{indent}fingerprint       {base.fingerprint}")
    print(f"{indent}source            {base.metadata.get('source')}")
    print(f"{indent}layers            {len(base.layers)}, quantized weights {r['n_quantized_params']}, dense "
          f"parameters {r['n_dense_params']}")
    print(f"{indent}size              {r['file_bytes']} bytes = {r['effective_bits']:.4f} effective bits per quantized "
          f"weight (code bits {r['code_bits']:.4f}; dense tensors {r['bytes']['dense']} bytes apart)")
    total = sum(r["width_histogram"].values())
    print(f"{indent}row widths        " + ", ".join(
        f"{w}-bit {n} ({100 * n / total:.0f}%)" for w, n in r["width_histogram"].items()))
    print(f"{indent}codebooks         {CODEBOOK_FORMAT_TEXT[base.codebook_format]}, {r['bytes']['codebooks']} bytes")
    rec = base.recovery
    if rec is None:
        print(f"{indent}recovery adapter  none")
        return
    bits = rec.info.get("compressed_bits")
    stored = ("float16 factors" if rec.blob is None
              else f"compressed{f' at {bits:g} bits' if isinstance(bits, (int, float)) else ''}")
    print(f"{indent}recovery adapter  rank {rec.rank} on {len(rec.factors)} layers, {stored}: {r['recovery_bytes']} "
          f"bytes = {r['recovery_bits']:.4f} bits per quantized weight, {r['effective_bits_with_recovery']:.4f} "
          "effective bits with it")
    print(f"{indent}plain base        {rec.info.get('plain_fingerprint')}")


def _envelope(data: bytes, what: str, trust: str | None) -> tuple[signed.Envelope | None, str | None]:
    """The signed envelope (None for an unsigned file) and, with ``trust``, the key that verified it."""
    from lowra.sdk.signing import trusted_keys

    if not signed.is_signed(data):
        if trust is not None:
            raise UnsignedFileError(f"{what} is not signed (format v1): there is no signature to verify")
        return None, None
    if trust is None:
        return signed.read_unverified(data, what), None
    keys = trusted_keys(trust)
    envelope = keys.policy().verify(data, what)
    return envelope, f"{envelope.key_id} ({keys.names[envelope.key_id]})"


def _as_json(envelope: signed.Envelope | None, verified_by: str | None, blob: Blob | None, file_bytes: int,
             modules: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"signed": None}
    if envelope is not None:
        out["signed"] = {"key_id": envelope.key_id, "verified": verified_by is not None, "verified_by": verified_by,
                         "encrypted": envelope.encrypted, "claims": envelope.claims, "file_bytes": file_bytes,
                         "envelope_bytes": file_bytes - envelope.claims["body_bytes"]}
    if blob is not None:
        out.update(metadata={k: v for k, v in blob.metadata.items() if k != "modules"}, bits=blob.bits_report(),
                   n_modules=len(blob.modules))
        if modules:
            out["modules"] = _module_rows(blob)
    return out


def _print_envelope(name: str, envelope: signed.Envelope, verified_by: str | None, file_bytes: int) -> None:
    claims = envelope.claims
    print(f"{name}: signed {claims['format']} file, format v{claims['format_version']} ({file_bytes} bytes, "
          f"{file_bytes - claims['body_bytes']} of them the signed envelope)")
    print(f"  key id            {envelope.key_id}")
    if verified_by is None:
        print("  signature not verified (no key given; pass --trust KEYS_DIR or a .pub.pem)")
    else:
        print(f"  signature         verified with key {verified_by}")
    if envelope.encrypted:
        print(f"  encrypted         yes ({claims['encryption']['alg']}, key check {claims['encryption']['key_check']})")
    else:
        print("  encrypted         no")
    print("  claims")
    for key in signed.CLAIM_KEYS:
        value = claims[key]
        print(f"    {key:17s} {json.dumps(value) if isinstance(value, dict) or value is None else value}")


def _print_blob(blob: Blob, title: str, indent: str, modules: bool) -> None:
    """The blob's report; ``title`` starts its first line and ``indent`` the others (deeper inside an envelope)."""
    report = blob.bits_report()
    meta = {k: v for k, v in blob.metadata.items() if k != "modules"}
    print(f"{title}lowra adapter blob v{meta['format_version']} (checksum ok)")
    for key in ("adapter_id", "base_fingerprint", "created"):
        print(f"{indent}{key:17s} {meta[key]}")
    for key in ("lora", "scheme", "card"):
        print(f"{indent}{key:17s} {json.dumps(meta[key])}")
    print(f"{indent}modules           {len(blob.modules)}, adapter parameters {report['n_params']}")
    print(
        f"{indent}size              {report['file_bytes']} bytes = {report['effective_bits']:.4f} effective "
        f"bits/param (code bits {report['code_bits']:.4f})"
    )
    print(f"{indent}bytes             " + ", ".join(f"{k} {v}" for k, v in report["bytes"].items()))
    total = sum(report["width_histogram"].values())
    print(f"{indent}channel widths    " + ", ".join(
        f"{w}-bit {n} ({100 * n / total:.0f}%)" for w, n in report["width_histogram"].items()))
    if modules:
        for row in _module_rows(blob):
            print(f"{indent}  {row['module']:45s} [{row['out']}x{row['in']}] r={row['rank']} down {row['down']} "
                  f"up {row['up']}")


def _module_rows(blob: Blob) -> list[dict[str, object]]:
    rows = []
    for i, m in enumerate(blob.modules):
        first = int(blob.layout.module_offsets[i])
        w = blob.layout.widths[first : first + 2 * m.rank].tolist()
        rows.append({"module": m.name, "out": m.out_features, "in": m.in_features, "rank": m.rank,
                     "down": w[: m.rank], "up": w[m.rank :]})
    return rows
