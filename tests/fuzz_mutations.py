"""Seeds, mutators and one classifier for fuzzing every lowra reader (issue 12: a strict, bounded reader).

A *seed* is a valid file: tiny adapter blobs bound to a tiny numpy base, tiny quantized bases, and their signed
(and encrypted) envelopes. A *mutator* turns a seed's bytes into a hostile variant: ``(rng, bytes) -> bytes``.
:func:`classify` runs the reader a device runs on the result (``DeviceRuntime.load_user`` for blobs,
``open_quantized_base`` for bases, each under the trust policy that fits the seed) and names what happened.

Mutators that only make sense with keys or the base (re-signing, recomputed base fingerprints) are closures built by
:class:`FuzzContext`. A mutator is ``legit`` when what it makes is a file a legitimate writer could have made (a
re-checksummed edit of an unsigned file that keeps every rule, or one re-signed with the trusted key): its
acceptance is expected and counted as a valid edit, not as a bug, since nothing can tell it from a real file.

Used by tests/device_runtime/test_fuzz.py (a fixed budget in CI) and bench/fuzz_formats.py (the long run).
numpy, cryptography and the sdk's signing helpers only: no torch.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import signal
import struct
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from lowra.device_runtime import formats as fmt
from lowra.device_runtime.errors import LowraError
from lowra.device_runtime.formats import container, signed
from lowra.device_runtime.formats.bitpack import (
    decode_widths,
    encode_widths,
    pack_codes,
)
from lowra.device_runtime.formats.int_levels import (
    MIN_EXPONENT,
    level_bit_counts as level_bits,
    level_limit,
    max_exponent,
    pack_level_ints,
    packed_level_bytes,
    unpack_level_ints,
)
from lowra.device_runtime.formats.quantized_base import (
    INT_LEVEL_TENSORS,
    LAYER_TENSORS,
    build_quantized_base_bytes,
    parse_quantized_base,
    quantized_fingerprint,
)
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.device_runtime.runtime import BaseWeights, DeviceRuntime
from lowra.device_runtime.trust import (
    SequenceStore,
    TrustPolicy,
    open_blob,
    open_quantized_base,
)
from lowra.sdk.signing import sign_bytes

from tests.device_runtime.conftest import make_blob_bytes, write_base

Mutator = Callable[[random.Random, bytes], bytes]

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)
USER = "alice"
SEQUENCE = 5
HANG_SECONDS = 1.0  # an input that takes longer is a hang (issue 12: "0 hangs over 1 s")
ABORT_SECONDS = 5  # signal.alarm stops a runaway reader here
MAX_MESSAGE_CHARS = 1000  # a refusal's message is one short line, whatever the input
# Memory a refusal may cost beyond what a valid seed's load does, whatever the file's size: the exception, its
# traceback's frames and a parsed header of a few KB (measured: < 50 KB).
MEMORY_SLACK = 256 << 10
# Copies of the input a reader may hold at once. A header is copied, decoded, parsed and re-serialized for the
# checksum (measured: 3.0x the file for a blob whose size is all header, bounded by LIMITS.max_header_bytes); a
# reader that allocates what a header announces (issue 12: a 100 MB header cost 2.6 GiB) is far above it.
MEMORY_FACTOR = 4

# Outcomes. The last four are bugs.
REFUSED = "refused"
SAME = "accepted-same"
VALID_EDIT = "valid-edit-accepted"
CHANGED = "accepted-changed"
FOREIGN = "foreign-exception"
HANG = "hang"
MEMORY = "memory-blowup"
BAD_MESSAGE = "bad-message"
OUTCOMES = (REFUSED, SAME, VALID_EDIT, CHANGED, FOREIGN, HANG, MEMORY, BAD_MESSAGE)
BUGS = frozenset({CHANGED, FOREIGN, HANG, MEMORY, BAD_MESSAGE})


@dataclass(frozen=True)
class Mutation:
    name: str
    apply: Mutator
    legit: bool = False  # its output may be a file a legitimate writer made: acceptance is a valid edit


@dataclass(frozen=True)
class Seed:
    name: str
    family: str  # "blob" or "base"
    data: bytes
    signed: bool = False
    encrypted: bool = False


@dataclass
class Result:
    outcome: str
    seconds: float
    peak_bytes: int
    error: str = ""  # "ExceptionType: message" of a refusal or a foreign exception
    trace: str = ""  # traceback tail of a foreign exception

    @property
    def is_bug(self) -> bool:
        return self.outcome in BUGS


# ----------------------------------------------------------------------------------------------- container edits
def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON header (insertion order kept) and the data section of a valid safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict[str, Any] | str | bytes, body: bytes) -> bytes:
    """A container from a header (an object, or its JSON text as is) and a data section; length prefix recomputed."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + body


def tensors_of(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Copies of every tensor and the metadata of a valid (unsigned) lowra file."""
    head = container.parse_header(data, len(data), "seed")
    return {n: container.tensor_from_buffer(data, i).copy() for n, i in head.tensors.items()}, dict(head.metadata)


def rechecksum(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """A file with these tensors and metadata whose ``payload_sha256`` is recomputed (what a forger does)."""
    meta = dict(meta)
    meta["payload_sha256"] = container.payload_digest(tensors, meta)
    return container.serialize(tensors, meta)


def _is_int_levels(tensors: dict[str, np.ndarray], name: str) -> bool:
    """Whether module ``name`` stores integer levels (a version-4 base) rather than float16 ``codebooks``."""
    return f"{name}.levels" in tensors


def level_ints(tensors: dict[str, np.ndarray], name: str, widths: np.ndarray) -> np.ndarray:
    """A version-4 layer's integer levels k (int64, sign-extended; each on its row's bits), read leniently: no
    range, order or padding check (a mutator may have broken those on purpose)."""
    return unpack_level_ints(tensors[f"{name}.levels"], widths)[0]


def store_level_ints(tensors: dict[str, np.ndarray], name: str, ints: np.ndarray, widths: np.ndarray) -> None:
    """``ints`` (each within its row's two's complement bits: -32..31 or -128..127) stored as the layer's
    ``levels`` stream (``packed_level_bytes`` bytes, zero padding)."""
    tensors[f"{name}.levels"] = pack_level_ints(ints, widths)
    assert tensors[f"{name}.levels"].size == packed_level_bytes(widths)


def layer_codebooks(tensors: dict[str, np.ndarray], name: str, widths: np.ndarray) -> np.ndarray:
    """A layer's float16 codebooks as the fingerprint hashes them: stored (versions 1-3), or ``k * 2**e`` of its
    integer levels (version 4, leniently: what a forger who recomputes the fingerprint hashes)."""
    if not _is_int_levels(tensors, name):
        return tensors[f"{name}.codebooks"]
    counts = 1 << np.asarray(widths, dtype=np.int64)
    exponents = tensors[f"{name}.level_exponents"].astype(np.int64)
    if exponents.shape != counts.shape or tensors[f"{name}.levels"].size < packed_level_bytes(widths):
        return np.zeros(0, np.float16)  # sizes the reader refuses before it hashes the layer (e.g. a row of width 0)
    ints = level_ints(tensors, name, widths)
    with np.errstate(over="ignore"):
        return (ints * np.exp2(np.repeat(exponents, counts))).astype(np.float16)


def refingerprint(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """A quantized base with its ``fingerprint`` and checksum recomputed after an edit of its tensors."""
    layers = {}
    for name, out_f, in_f, group in json.loads(meta["modules"]):
        widths = decode_widths(tensors[f"{name}.widths"], out_f)
        layers[name] = QuantizedWeight(
            out_f, in_f, group, widths, tensors[f"{name}.codes"], layer_codebooks(tensors, name, widths),
            tensors[f"{name}.scales"])
    meta = dict(meta)
    meta["fingerprint"] = quantized_fingerprint(layers)
    return rechecksum(tensors, meta)


def _pick(rng: random.Random, values: list[Any]) -> Any:
    return values[rng.randrange(len(values))]


def _tensor_names(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# ----------------------------------------------------------------------------------------------- byte mutators
def bit_flip(rng: random.Random, data: bytes) -> bytes:
    """1..8 random bits flipped, half the time inside the JSON header (where the grammar lives)."""
    out = bytearray(data)
    (n,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (len(data),)
    span = min(len(out), 8 + n) if rng.random() < 0.5 else len(out)
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(span)
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def extend_random(rng: random.Random, data: bytes) -> bytes:
    return data + rng.randbytes(rng.randint(1, 4096))


def extend_zeros(rng: random.Random, data: bytes) -> bytes:
    return data + bytes(1 << 20 if rng.random() < 0.05 else rng.randint(1, 4096))


def header_length(rng: random.Random, data: bytes) -> bytes:
    """The 8-byte header length field set to a wrong, huge or wrapping value."""
    (n,) = struct.unpack("<Q", data[:8])
    value = _pick(rng, [0, 1, n - 1, n + 1, n + 8, len(data), len(data) - 8, (1 << 20) + 1, (16 << 20) + 1,
                        100 << 20, 1 << 63, (1 << 64) - 1, rng.getrandbits(64)])
    return struct.pack("<Q", value % (1 << 64)) + data[8:]


# ----------------------------------------------------------------------------------------------- header grammar
def _edit_entry(key: str, values: Callable[[random.Random, dict[str, Any]], list[Any]]) -> Mutator:
    def mutate(rng: random.Random, data: bytes) -> bytes:
        header, body = split(data)
        entry = header[_pick(rng, _tensor_names(header))]
        entry[key] = _pick(rng, values(rng, entry))
        return join(header, body)

    mutate.__name__ = f"edit_{key}"
    return mutate


def _shapes(rng: random.Random, entry: dict[str, Any]) -> list[Any]:
    shape = entry["shape"]
    first = shape[0] if shape else 1
    return [
        [float(d) for d in shape], [str(d) for d in shape], [-first] + shape[1:], [-1, -first],
        [1 << 40] + shape[1:], [(1 << 40) + 1], [1 << 63], [1 << 64], [1 << 32, 1 << 32], [1 << 32, 1 << 32, 0],
        [[d] for d in shape], [shape], [True] * len(shape), [None], [], [1] * 9, [0], "1", 1, None, {"0": first},
        [1.5], [1e308], shape + [1], shape[::-1] + [2], [first // 2, 2] if first % 2 == 0 else [first, 1],
    ]


def _offsets(rng: random.Random, entry: dict[str, Any]) -> list[Any]:
    begin, end = entry["data_offsets"]
    k = rng.randint(1, 16)
    return [
        [float(begin), float(end)], [str(begin), str(end)], [-k, end - begin - k], [begin - k, end - k],
        [begin + k, end + k], [end, begin], [begin, 1 << 40], [begin, 1 << 64], [1 << 64, (1 << 64) + end - begin],
        [begin, end, end], [begin], [], [True, end], [None, end], f"{begin},{end}", begin, [[begin], [end]],
        [begin, end + 0.5], [0, end - begin],
    ]


def _dtypes(rng: random.Random, entry: dict[str, Any]) -> list[Any]:
    same_size = {"U8": ["I8", "BOOL"], "F16": ["I16", "BF16"], "F32": ["I32"], "I64": ["F64"]}
    return ["F8", "Q4", "f16", "u8", "", "F16 ", "F128", ["F16"], 2, None, {"F16": 1}, "F32", "F64",
            *same_size.get(entry["dtype"], ["U8"])]


edit_shape = _edit_entry("shape", _shapes)
edit_offsets = _edit_entry("data_offsets", _offsets)
edit_dtype = _edit_entry("dtype", _dtypes)


def duplicate_key_text(rng: random.Random, data: bytes) -> bytes:
    """A key repeated in the JSON text (a tensor entry, a metadata key, or a key inside an entry): last-wins
    parsers would read another file than a strict one."""
    header, body = split(data)
    text = json.dumps(header, separators=(",", ":"))
    name = _pick(rng, _tensor_names(header))
    entry = header[name]
    choice = rng.randrange(4)
    if choice == 0:  # the same tensor twice, the first copy pointing elsewhere
        fake = dict(entry, data_offsets=[0, entry["data_offsets"][1] - entry["data_offsets"][0]])
        text = "{" + json.dumps(name) + ":" + json.dumps(fake, separators=(",", ":")) + "," + text[1:]
    elif choice == 1:  # a metadata key twice
        key = _pick(rng, list(header["__metadata__"]))
        text = text.replace('"__metadata__":{', '"__metadata__":{' + json.dumps(key) + ':"mallory",', 1)
    elif choice == 2:  # the same key inside a tensor entry
        text = text.replace(json.dumps(name) + ":{", json.dumps(name) + ':{"dtype":"U8",', 1)
    else:  # __metadata__ twice
        text = "{" + '"__metadata__":{},' + text[1:]
    return join(text, body)


def deep_nesting(rng: random.Random, data: bytes) -> bytes:
    """Nesting far beyond Python's recursion limit, in an entry, in a shape or as the whole header."""
    header, body = split(data)
    depth = _pick(rng, [1000, 10_000, 100_000])
    nested = "[" * depth + "]" * depth
    text = json.dumps(header, separators=(",", ":"))
    choice = rng.randrange(3)
    if choice == 0:
        text = "{" + '"deep":' + nested + "," + text[1:]
    elif choice == 1:
        name = _pick(rng, _tensor_names(header))
        text = text.replace(json.dumps(name) + ':{"dtype"', json.dumps(name) + ':{"shape":' + nested + ',"dtype"', 1)
    else:
        text = '{"a":' * depth + "1" + "}" * depth
    return join(text, body)


def _rename(rng: random.Random, data: bytes, new_name: Callable[[str], str]) -> bytes:
    header, body = split(data)
    names = _tensor_names(header)
    if rng.random() < 0.3:  # a metadata key instead
        meta = header["__metadata__"]
        key = _pick(rng, list(meta))
        header["__metadata__"] = {(new_name(k) if k == key else k): v for k, v in meta.items()}
    else:
        old = _pick(rng, names)
        header = {(new_name(k) if k == old else k): v for k, v in header.items()}
    return join(json.dumps(header, separators=(",", ":"), ensure_ascii=True), body)


def surrogate_name(rng: random.Random, data: bytes) -> bytes:
    """A name with a lone surrogate: escaped in the JSON (valid JSON, invalid Unicode) or as raw CESU bytes."""
    mutated = _rename(rng, data, lambda k: _pick(rng, ["\ud800", k + "\udfff", "\ud800" + k]))
    if rng.random() < 0.3:  # the raw bytes ED A0 80: not valid UTF-8 at all
        header, body = split(mutated)
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
        return join(text, body)
    return mutated


def nonprintable_name(rng: random.Random, data: bytes) -> bytes:
    return _rename(rng, data, lambda k: _pick(rng, [k + "\x00", "\x1b[31m" + k, k[:2] + "\n" + k[2:], "", " ",
                                                    k + "\u200b", k + "\u2028", "x" * 5000, k + "\x7f"]))


def entry_keys(rng: random.Random, data: bytes) -> bytes:
    """A tensor entry with an extra key, a missing key, or not an object at all."""
    header, body = split(data)
    name = _pick(rng, _tensor_names(header))
    entry = header[name]
    choice = rng.randrange(4)
    if choice == 0:
        entry[_pick(rng, ["extra", "offsets", "Dtype"])] = 1
    elif choice == 1:
        del entry[_pick(rng, list(entry))]
    elif choice == 2:
        header[name] = _pick(rng, [[entry["dtype"], entry["shape"], entry["data_offsets"]], None, "x", 1, []])
    else:
        header[name] = {}
    return join(header, body)


def header_shape(rng: random.Random, data: bytes) -> bytes:
    """The header as something other than an object of entries, or with bytes after its JSON."""
    header, body = split(data)
    text = json.dumps(header, separators=(",", ":"))
    return join(_pick(rng, ["[]", "null", '"x"', "1", "", text + "x", text + "{}", text + "\x00", text + "   ",
                            "\ufeff" + text, text[:-1], '{"__metadata__":[]}', '{"__metadata__":null}',
                            text.replace('"__metadata__":{', '"__metadata__":{"n":1,', 1),
                            text.replace('"__metadata__":{', '"__metadata__":{"l":["x"],', 1),
                            text.replace('"__metadata__":{', '"__metadata__":{"z":null,', 1)]), body)


def extra_tensor(rng: random.Random, data: bytes) -> bytes:
    """An extra entry that spans no bytes (so the data ranges still tile), possibly with huge dims."""
    header, body = split(data)
    end = len(body)
    shape = _pick(rng, [[0], [1 << 40, 0], [0, 1 << 40, 1 << 40], [1 << 32, 1 << 32, 0]])
    name = _pick(rng, ["extra", "codes.extra", "zz", "model.norm.bias"])
    header[name] = {"dtype": _pick(rng, ["U8", "F32", "I64"]), "shape": shape, "data_offsets": [end, end]}
    return join(header, body)


BYTE_MUTATIONS = (
    Mutation("bit_flip", bit_flip),
    Mutation("truncate", truncate),
    Mutation("extend_random", extend_random),
    Mutation("extend_zeros", extend_zeros),
)
CONTAINER_MUTATIONS = BYTE_MUTATIONS + (
    Mutation("header_length", header_length),
    Mutation("edit_shape", edit_shape),
    Mutation("edit_offsets", edit_offsets),
    Mutation("edit_dtype", edit_dtype),
    Mutation("duplicate_key_text", duplicate_key_text),
    Mutation("deep_nesting", deep_nesting),
    Mutation("surrogate_name", surrogate_name),
    Mutation("nonprintable_name", nonprintable_name),
    Mutation("entry_keys", entry_keys),
    Mutation("header_shape", header_shape),
    Mutation("extra_tensor", extra_tensor),
)


# ----------------------------------------------------------------------------------------------- metadata edits
MetaEdit = Callable[[random.Random, dict[str, str]], None]


def _json_edit(key: str, values: Callable[[random.Random, Any], list[Any]]) -> MetaEdit:
    def edit(rng: random.Random, meta: dict[str, str]) -> None:
        value = _pick(rng, values(rng, json.loads(meta[key])))
        meta[key] = value if isinstance(value, str) and rng.random() < 0.5 else json.dumps(value)

    return edit


def _module_values(rng: random.Random, table: list[list[Any]]) -> list[Any]:
    i = rng.randrange(len(table))
    entry = table[i]

    def at(j: int, value: Any) -> list[Any]:
        edited = [list(e) for e in table]
        edited[i][j] = value
        return edited

    j = rng.randint(1, 3)
    return [
        table + [entry], [entry] + table, at(j, -entry[j]), at(j, 0), at(j, 1 << 40), at(j, 1 << 64), at(j, 10**400),
        at(j, float(entry[j])), at(j, str(entry[j])), at(j, True), at(j, None), at(j, [entry[j]]), at(0, 7),
        at(0, entry[0] + " "), at(0, "\ud800"), at(0, "../" + entry[0]), at(0, ""), at(0, entry[0].upper()),
        [entry[:3]], [entry + [1]], [], {}, entry, "[[", "[" * 100_000, [[f"m{k}.w", 1 << 20, 1 << 20, 4096] for k in range(3)],
        [[entry[0], entry[2], entry[1], entry[3]]] + table[1:],
    ]


def _set(key: str, values: list[str | None]) -> MetaEdit:
    def edit(rng: random.Random, meta: dict[str, str]) -> None:
        value = _pick(rng, values)
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value

    return edit


def _json_garbage(keys: tuple[str, ...]) -> MetaEdit:
    def edit(rng: random.Random, meta: dict[str, str]) -> None:
        meta[_pick(rng, list(keys))] = _pick(rng, ["", "{", "NaN", '{"a":NaN}', '{"a":1,"a":2}', "[" * 100_000,
                                                   '{"a":' * 50_000 + "1" + "}" * 50_000, "1e999", "nul"])

    return edit


def _drop_required(required: tuple[str, ...]) -> MetaEdit:
    def edit(rng: random.Random, meta: dict[str, str]) -> None:
        meta.pop(_pick(rng, list(required)), None)

    return edit


VERSIONS = ["2", "0", "-1", "1.0", " 1", "1 ", "+1", "01", "1_0", "\u0661", "", "1e0", "0x1", "99999999999999999999", None]
FORMATS = ["lowra-base", "lowra-adapter", "", "LOWRA-ADAPTER", "lowra-adapter ", None]


def _meta_mutations(prefix: str, edits: dict[str, tuple[MetaEdit, bool]], rebuild: Callable[..., bytes]
                    ) -> tuple[Mutation, ...]:
    """Each metadata edit twice: as is (the checksum must catch it) and re-checksummed (the semantics must)."""
    out = []
    for name, (edit, legit) in edits.items():
        def plain(rng: random.Random, data: bytes, edit: MetaEdit = edit) -> bytes:
            header, body = split(data)
            edit(rng, header["__metadata__"])
            return join(json.dumps(header, separators=(",", ":"), ensure_ascii=False), body)

        def summed(rng: random.Random, data: bytes, edit: MetaEdit = edit) -> bytes:
            tensors, meta = tensors_of(data)
            edit(rng, meta)
            return rebuild(tensors, meta)

        out.append(Mutation(f"{prefix}meta:{name}", plain))
        out.append(Mutation(f"{prefix}meta+sum:{name}", summed, legit))
    return tuple(out)


def _blob_meta_edits() -> dict[str, tuple[MetaEdit, bool]]:
    return {
        "modules": (_json_edit("modules", _module_values), False),
        "format": (_set("format", FORMATS[:1] + FORMATS[2:]), False),
        "version": (_set("format_version", VERSIONS), False),
        "json_garbage": (_json_garbage(fmt.JSON_METADATA), False),
        "drop_required": (_drop_required(fmt.REQUIRED_METADATA), False),
        "base_fingerprint": (_set("base_fingerprint", ["sha256:" + "0" * 64, "", "sha256:", "x" * 10_000]), False),
        "informative": (_set(_INFORMATIVE_KEY, ["hello", "\u00e9t\u00e9", "x" * 10_000]), True),
        "card": (_set("card", ['{"task":"other"}', "[]", "{}", '{"n":1e308}']), True),
        "adapter_id": (_set("adapter_id", ["mallory", "", "x" * 1000]), True),
    }


_INFORMATIVE_KEY = "x-note"


# ----------------------------------------------------------------------------------------------- blob semantics
def _blob_parts(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str], fmt.Layout]:
    tensors, meta = tensors_of(data)
    modules = [fmt.ModuleEntry(*m) for m in json.loads(meta["modules"])]
    n_channels = sum(2 * m.rank for m in modules)
    return tensors, meta, fmt.Layout.build(modules, decode_widths(tensors["widths"], n_channels))


def _coded_channel(rng: random.Random, layout: fmt.Layout, min_width: int = 1) -> int:
    return _pick(rng, [c for c in range(layout.n_channels) if layout.widths[c] >= min_width])


def unsorted_codebook(rng: random.Random, data: bytes) -> bytes:
    tensors, meta, layout = _blob_parts(data)
    c = _coded_channel(rng, layout)
    start, end = layout.level_offsets[c], layout.level_offsets[c + 1]
    levels = tensors["codebooks"]
    levels[start:end] = levels[start:end][::-1].copy()  # descending: distinct seeds levels make this unsorted
    return rechecksum(tensors, meta)


def nonfinite_level(rng: random.Random, data: bytes) -> bytes:
    tensors, meta, layout = _blob_parts(data)
    c = _coded_channel(rng, layout)
    levels = tensors["codebooks"]
    levels[rng.randrange(layout.level_offsets[c], layout.level_offsets[c + 1])] = _pick(rng, [np.nan, np.inf, -np.inf])
    return rechecksum(tensors, meta)


def duplicated_module(rng: random.Random, data: bytes) -> bytes:
    """A module entry listed twice with its channels copied, so every size still agrees: the second copy would
    add the delta twice (or cancel it with negated levels)."""
    tensors, meta, layout = _blob_parts(data)
    i = rng.randrange(len(layout.modules))
    channels = range(layout.module_offsets[i], layout.module_offsets[i + 1])
    widths = np.concatenate([layout.widths, layout.widths[list(channels)]])
    codes = [tensors["codes"][layout.code_offsets[c] : layout.code_offsets[c + 1]] for c in channels]
    levels = [tensors["codebooks"][layout.level_offsets[c] : layout.level_offsets[c + 1]] for c in channels]
    if rng.random() < 0.5:  # negated and re-sorted: the copy cancels the first
        levels = [-lv[::-1] for lv in levels]
        codes = [_negate_codes(cd, int(layout.widths[c]), int(layout.lengths[c])) for cd, c in zip(codes, channels)]
    tensors["codes"] = np.concatenate([tensors["codes"], *codes])
    tensors["codebooks"] = np.concatenate([tensors["codebooks"], *levels]).astype(fmt.CODEBOOK_DTYPE)
    tensors["widths"] = encode_widths(widths)
    table = json.loads(meta["modules"])
    meta["modules"] = json.dumps(table + [table[i]], separators=(",", ":"))
    return rechecksum(tensors, meta)


def _negate_codes(packed: np.ndarray, width: int, length: int) -> np.ndarray:
    """Codes that pick level ``2**w - 1 - k`` where the originals picked ``k`` (for reversed levels)."""
    if width == 0:
        return packed
    from lowra.device_runtime.formats.bitpack import unpack_codes

    idx = unpack_codes(packed[None, :], width, length)
    return pack_codes(((1 << width) - 1 - idx).astype(np.uint8), width)[0]


def level_nudge(rng: random.Random, data: bytes) -> bytes:
    """A level moved strictly between its neighbours: a different but valid adapter (legit when re-checksummed)."""
    tensors, meta, layout = _blob_parts(data)
    c = _coded_channel(rng, layout)
    start, end = int(layout.level_offsets[c]), int(layout.level_offsets[c + 1])
    levels = tensors["codebooks"].astype(np.float32)
    k = rng.randrange(start, end)
    low = levels[k - 1] if k > start else levels[k] - 0.1
    high = levels[k + 1] if k + 1 < end else levels[k] + 0.1
    tensors["codebooks"][k] = np.float16((low + high) / 2)
    return rechecksum(tensors, meta)


def code_byte(rng: random.Random, data: bytes) -> bytes:
    """Any code byte changed (legit when re-checksummed: every index is valid)."""
    tensors, meta, _ = _blob_parts(data)
    codes = tensors["codes"]
    codes[rng.randrange(codes.size)] ^= rng.randint(1, 255)
    return rechecksum(tensors, meta)


def width_padding(rng: random.Random, data: bytes) -> bytes:
    """Bits set in the width map's padding after the last channel (no channel changes)."""
    tensors, meta, layout = _blob_parts(data)
    spare = 4 * tensors["widths"].size - layout.n_channels
    if spare:
        tensors["widths"][-1] |= np.uint8((0xFF << (8 - 2 * spare)) & 0xFF)
    return rechecksum(tensors, meta)


def tensor_dtype_swap(rng: random.Random, data: bytes) -> bytes:
    """A tensor stored as another dtype with the same bytes (re-checksummed): codes as int8, levels as int16."""
    tensors, meta = tensors_of(data)
    name = _pick(rng, sorted(tensors))
    target = {"u": [np.int8, np.bool_], "f": [np.int16, np.uint8], "i": [np.uint8]}[tensors[name].dtype.kind]
    tensors[name] = tensors[name].view(_pick(rng, target))
    return rechecksum(tensors, meta)


def _retarget(base: BaseWeights, pick: Callable[[random.Random, dict[str, np.ndarray], list[Any], set[str]], str | None]
              ) -> Mutator:
    """One module entry pointed at another base tensor, with the base fingerprint recomputed from the public base
    (what anyone holding the base can do)."""
    def mutate(rng: random.Random, data: bytes) -> bytes:
        tensors, meta = tensors_of(data)
        table = json.loads(meta["modules"])
        i = rng.randrange(len(table))
        new = pick(rng, base.tensors, table[i], {e[0] for e in table})
        if new is not None:
            table[i][0] = new
        names = [e[0] for e in table]
        meta["modules"] = json.dumps(table, separators=(",", ":"))
        if all(f"{n}.weight" in base.tensors for n in names):
            meta["base_fingerprint"] = base.fingerprint(names)
        return rechecksum(tensors, meta)

    return mutate


def _non_linear(rng: random.Random, tensors: dict[str, np.ndarray], entry: list[Any], used: set[str]) -> str | None:
    return _pick(rng, [n[: -len(".weight")] for n, a in tensors.items() if a.ndim != 2 and n.endswith(".weight")])


def _same_shape_linear(rng: random.Random, tensors: dict[str, np.ndarray], entry: list[Any], used: set[str]
                       ) -> str | None:
    free = [n[: -len(".weight")] for n, a in tensors.items() if n.endswith(".weight")
            and list(a.shape) == entry[1:3] and n[: -len(".weight")] not in used]
    return _pick(rng, free) if free else None


def blob_mutations(base: BaseWeights) -> tuple[Mutation, ...]:
    """Every mutation of an unsigned adapter blob; ``base`` is the base it binds to (for recomputed fingerprints)."""
    return CONTAINER_MUTATIONS + _meta_mutations("", _blob_meta_edits(), rechecksum) + (
        Mutation("sum:unsorted_codebook", unsorted_codebook),
        Mutation("sum:nonfinite_level", nonfinite_level),
        Mutation("sum:duplicated_module", duplicated_module),
        Mutation("sum:tensor_dtype_swap", tensor_dtype_swap),
        Mutation("sum:retarget_non_linear", _retarget(base, _non_linear)),
        Mutation("sum:width_padding", width_padding, legit=True),
        Mutation("sum:level_nudge", level_nudge, legit=True),
        Mutation("sum:code_byte", code_byte, legit=True),
        Mutation("sum:retarget_same_shape", _retarget(base, _same_shape_linear), legit=True),
    )


# ----------------------------------------------------------------------------------------------- base semantics
def _base_parts(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str], list[list[Any]]]:
    tensors, meta = tensors_of(data)
    return tensors, meta, json.loads(meta["modules"])


def _layer_widths(tensors: dict[str, np.ndarray], name: str, out_f: int) -> np.ndarray:
    return decode_widths(tensors[f"{name}.widths"], out_f).astype(np.int64)


def _row_levels(tensors: dict[str, np.ndarray], name: str, out_f: int, rng: random.Random) -> tuple[int, int, int]:
    """A random row of the layer: (row, its first level, the end of its levels) in the layer's codebooks."""
    offsets = np.concatenate([[0], np.cumsum(1 << _layer_widths(tensors, name, out_f))])
    r = rng.randrange(out_f)
    return r, int(offsets[r]), int(offsets[r + 1])


def _padding_bits(tensors: dict[str, np.ndarray], name: str, out_f: int) -> int:
    """Unused high bits of a version-4 layer's last ``levels`` byte."""
    widths = _layer_widths(tensors, name, out_f)
    return 8 * packed_level_bytes(widths) - int(level_bits(widths).sum())


def base_unsorted_codebook(rng: random.Random, data: bytes) -> bytes:
    """A row's levels reversed (descending: the seeds' levels are distinct); in a version-4 base, its integers."""
    tensors, meta, table = _base_parts(data)
    name, out_f, _, _ = _pick(rng, table)
    _, start, end = _row_levels(tensors, name, out_f, rng)
    if _is_int_levels(tensors, name):
        widths = _layer_widths(tensors, name, out_f)
        ints = level_ints(tensors, name, widths)
        ints[start:end] = ints[start:end][::-1].copy()
        store_level_ints(tensors, name, ints, widths)
        return refingerprint(tensors, meta)
    levels = tensors[f"{name}.codebooks"]
    levels[start:end] = levels[start:end][::-1].copy()
    return refingerprint(tensors, meta)


def base_nonfinite(rng: random.Random, data: bytes) -> bytes:
    """A level or a scale set to NaN or an infinity; in a version-4 base, a level made unrepresentable instead: a
    row's exponent outside its width's range (-24..11 for 6-bit levels, -24..9 for 8-bit ones, which the integers
    would otherwise take up to 127 * 2**127) or an integer one below its row's limit (-32 or -128)."""
    tensors, meta, table = _base_parts(data)
    name, out_f, _, _ = _pick(rng, table)
    field = _pick(rng, ['codebooks', 'scales'])
    if field == "codebooks" and _is_int_levels(tensors, name):
        widths = _layer_widths(tensors, name, out_f)
        if rng.random() < 0.5:
            r = rng.randrange(out_f)
            top = max_exponent(int(widths[r]))
            # above the row's range: 10..12 on a 4-bit row (10 and 11 are in a 1- or 2-bit row's), 12 on others
            above = rng.randint(top + 1, 12)
            tensors[f"{name}.level_exponents"][r] = _pick(rng, [MIN_EXPONENT - 1, above, -128, 127, 16])
        else:
            ints = level_ints(tensors, name, widths)
            k = rng.randrange(ints.size)
            ints[k] = -level_limit(int(np.repeat(widths, 1 << widths)[k])) - 1
            store_level_ints(tensors, name, ints, widths)
        return refingerprint(tensors, meta)
    arr = tensors[f"{name}.{field}"]
    if arr.size:
        arr.reshape(-1)[rng.randrange(arr.size)] = _pick(rng, [np.nan, np.inf, -np.inf])
    return refingerprint(tensors, meta)


def base_level_padding(rng: random.Random, data: bytes) -> bytes:
    """Bits set after a version-4 layer's last level (no level changes; the fingerprint hashes the decoded levels,
    so only the reader's padding check can refuse it). A float16 base, or layers without padding (an even number of
    1-bit rows): unchanged."""
    tensors, meta, table = _base_parts(data)
    padded = [(e[0], e[1]) for e in table if _is_int_levels(tensors, e[0]) and _padding_bits(tensors, e[0], e[1])]
    if padded:
        name, out_f = _pick(rng, padded)
        used = 8 - _padding_bits(tensors, name, out_f)
        tensors[f"{name}.levels"][-1] |= np.uint8(1 << rng.randrange(used, 8))
    return refingerprint(tensors, meta)


def base_level_edit(rng: random.Random, data: bytes) -> bytes:
    """A valid change of a row's levels (legit: re-fingerprinted, every rule kept). Float16: a level moved strictly
    between its neighbours. Version 4: a row's exponent moved within its width's range (-24..11 or -24..9), or a
    level's integer moved within its neighbours' range (at most its row's limit, 31 or 127)."""
    tensors, meta, table = _base_parts(data)
    name, out_f, _, _ = _pick(rng, table)
    row, start, end = _row_levels(tensors, name, out_f, rng)
    if _is_int_levels(tensors, name):
        widths = _layer_widths(tensors, name, out_f)
        if rng.random() < 0.5:
            exponents = tensors[f"{name}.level_exponents"]
            e = int(exponents[row])
            top = max_exponent(int(widths[row]))
            exponents[row] = _pick(rng, [x for x in range(MIN_EXPONENT, top + 1) if x != e])
        else:
            ints = level_ints(tensors, name, widths)
            k = rng.randrange(start, end)
            limit = level_limit(int(widths[row]))
            low = ints[k - 1] if k > start else -limit
            high = ints[k + 1] if k + 1 < end else limit
            ints[k] = rng.randint(int(low), int(high))
            store_level_ints(tensors, name, ints, widths)
        return refingerprint(tensors, meta)
    levels = tensors[f"{name}.codebooks"].astype(np.float32)
    k = rng.randrange(start, end)
    low = levels[k - 1] if k > start else levels[k] - 0.1
    high = levels[k + 1] if k + 1 < end else levels[k] + 0.1
    tensors[f"{name}.codebooks"][k] = np.float16((low + high) / 2)
    return refingerprint(tensors, meta)


def _dense_names(tensors: dict[str, np.ndarray], table: list[list[Any]]) -> list[str]:
    layer = {f"{e[0]}.{t}" for e in table for t in LAYER_TENSORS + INT_LEVEL_TENSORS}
    return sorted(n for n in tensors if n not in layer)


def dense_nonfinite(rng: random.Random, data: bytes) -> bytes:
    tensors, meta, table = _base_parts(data)
    arr = tensors[_pick(rng, _dense_names(tensors, table))]
    arr.reshape(-1)[rng.randrange(arr.size)] = _pick(rng, [np.nan, np.inf, -np.inf])
    return refingerprint(tensors, meta)


def dense_shadow(rng: random.Random, data: bytes) -> bytes:
    """A dense ``{module}.weight`` beside the quantized module: a reader preferring it would run other weights."""
    tensors, meta, table = _base_parts(data)
    name, out_f, in_f, _ = _pick(rng, table)
    tensors[f"{name}.weight"] = np.zeros((out_f, in_f), np.float16)
    return refingerprint(tensors, meta)


def dense_edit(rng: random.Random, data: bytes) -> bytes:
    """A finite dense value changed, or a dense tensor stored at another float dtype (legit)."""
    tensors, meta, table = _base_parts(data)
    name = _pick(rng, _dense_names(tensors, table))
    if rng.random() < 0.5:
        tensors[name].reshape(-1)[rng.randrange(tensors[name].size)] += np.float16(0.5)
    else:
        tensors[name] = tensors[name].astype(np.float32)
    return refingerprint(tensors, meta)


def base_code_byte(rng: random.Random, data: bytes) -> bytes:
    tensors, meta, table = _base_parts(data)
    codes = tensors[f"{_pick(rng, table)[0]}.codes"]
    codes[rng.randrange(codes.size)] ^= rng.randint(1, 255)
    return refingerprint(tensors, meta)


def base_width_zero(rng: random.Random, data: bytes) -> bytes:
    """A row of width 0 with its codes and levels removed, so every size still agrees."""
    tensors, meta, table = _base_parts(data)
    name, out_f, in_f, _ = _pick(rng, table)
    widths = decode_widths(tensors[f"{name}.widths"], out_f).astype(np.int64)
    r = rng.randrange(out_f)
    code_off = np.concatenate([[0], np.cumsum((in_f * widths + 7) // 8)])
    level_off = np.concatenate([[0], np.cumsum(1 << widths)])
    tensors[f"{name}.codes"] = np.delete(tensors[f"{name}.codes"], np.s_[code_off[r] : code_off[r + 1]])
    if _is_int_levels(tensors, name):  # the row's integers and its exponent
        ints = level_ints(tensors, name, widths)
        store_level_ints(tensors, name, np.delete(ints, np.s_[level_off[r] : level_off[r + 1]]), np.delete(widths, r))
        tensors[f"{name}.level_exponents"] = np.delete(tensors[f"{name}.level_exponents"], r)
    else:
        tensors[f"{name}.codebooks"] = np.delete(tensors[f"{name}.codebooks"], np.s_[level_off[r] : level_off[r + 1]])
    widths[r] = 0
    tensors[f"{name}.widths"] = encode_widths(widths)
    return refingerprint(tensors, meta)


def base_layer_tensor(rng: random.Random, data: bytes) -> bytes:
    """A layer tensor dropped or stored at another dtype (fingerprint recomputed over what the file keeps); in a
    version-4 base, one of its integer-level tensors, or a float16 ``codebooks`` added beside them (the other
    layout)."""
    tensors, meta, table = _base_parts(data)
    module, out_f, _, _ = _pick(rng, table)
    has_levels = _is_int_levels(tensors, module)
    fields = ['codebooks', 'codes', 'scales', 'widths'] + (['level_exponents'] if has_levels else [])
    name = f"{module}.{_pick(rng, fields)}"
    if has_levels and name.endswith(".codebooks"):
        if rng.random() < 0.5:  # the levels under their float16 name, beside or instead of the integer-level tensors
            widths = decode_widths(tensors[f"{module}.widths"], out_f)
            tensors[name] = layer_codebooks(tensors, module, widths).copy()
            if rng.random() < 0.5:
                for t in INT_LEVEL_TENSORS:
                    del tensors[f"{module}.{t}"]
            return rechecksum(tensors, meta)
        name = f"{module}.levels"
    if rng.random() < 0.3:
        del tensors[name]
        return rechecksum(tensors, meta)
    tensors[name] = tensors[name].astype(_pick(rng, [t for t in (np.float32, np.int8, np.int16, np.uint8)
                                                     if np.dtype(t) != tensors[name].dtype][:3]))
    return rechecksum(tensors, meta)


def _alias_edit(legit: bool) -> Mutator:
    def mutate(rng: random.Random, data: bytes) -> bytes:
        tensors, meta, table = _base_parts(data)
        dense = _dense_names(tensors, table)
        aliases = json.loads(meta["aliases"])
        if legit:  # another tied tensor of the same kind, which the reader cannot tell from a real one
            target = _pick(rng, [n for n in dense if n.endswith(".weight")])
            aliases["model.layers.9.tied.weight"] = target
        else:
            layer = _pick(rng, table)[0]
            aliases.update([_pick(rng, [
                ("lm_head.bias", "model.embed_tokens.weight"), ("lm_head.weight", "model.absent.weight"),
                (dense[0], dense[-1]), (f"{layer}.weight", _pick(rng, dense)), ("", dense[0]),
                ("\ud800", dense[0]), ("lm_head.weight", 3), ("lm_head.weight", f"{layer}.codes"),
            ])])
        meta["aliases"] = json.dumps(aliases) if rng.random() < 0.9 else "[]"
        return refingerprint(tensors, meta)

    return mutate


def _base_meta_edits() -> dict[str, tuple[MetaEdit, bool]]:
    from lowra.device_runtime.formats.quantized_base import (
        JSON_METADATA,
        REQUIRED_METADATA,
    )

    return {
        "modules": (_json_edit("modules", _module_values), False),
        "format": (_set("format", FORMATS[1:]), False),
        "version": (_set("format_version", VERSIONS), False),
        "json_garbage": (_json_garbage(JSON_METADATA), False),
        "drop_required": (_drop_required(REQUIRED_METADATA), False),
        "fingerprint": (_set("fingerprint", ["sha256:" + "0" * 64, "", "x" * 10_000]), False),
        "informative": (_set(_INFORMATIVE_KEY, ["hello", "x" * 10_000]), True),
        "report": (_set("report", ['{"a":1}', "{}", "[]"]), True),
    }


def base_mutations() -> tuple[Mutation, ...]:
    """Every mutation of an unsigned quantized base file."""
    return CONTAINER_MUTATIONS + _meta_mutations("", _base_meta_edits(), rechecksum) + (
        Mutation("sum:base_unsorted_codebook", base_unsorted_codebook),
        Mutation("sum:base_nonfinite", base_nonfinite),
        Mutation("sum:base_level_padding", base_level_padding),
        Mutation("sum:dense_nonfinite", dense_nonfinite),
        Mutation("sum:dense_shadow", dense_shadow),
        Mutation("sum:base_width_zero", base_width_zero),
        Mutation("sum:base_layer_tensor", base_layer_tensor),
        Mutation("sum:alias_invalid", _alias_edit(False)),
        Mutation("sum:alias_same_kind", _alias_edit(True), legit=True),
        Mutation("sum:dense_edit", dense_edit, legit=True),
        Mutation("sum:base_code_byte", base_code_byte, legit=True),
        Mutation("sum:base_level_edit", base_level_edit, legit=True),
    )


# ----------------------------------------------------------------------------------------------- signed envelopes
def raw_public_key(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key(label: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


@dataclass(frozen=True)
class Keys:
    trusted: ed25519.Ed25519PrivateKey = field(default_factory=lambda: _key("lowra fuzz: the server"))
    attacker: ed25519.Ed25519PrivateKey = field(default_factory=lambda: _key("lowra fuzz: an attacker"))
    aes: bytes = hashlib.sha256(b"lowra fuzz: alice's key").digest()

    @property
    def trusted_id(self) -> str:
        return signed.key_id(raw_public_key(self.trusted))


def _opened(keys: Keys, data: bytes) -> tuple[signed.Envelope, bytes]:
    envelope = signed.open_envelope(data, raw_public_key(keys.trusted))
    return envelope, bytes(signed.decrypt_payload(envelope, keys.aes))


DERIVED_CLAIMS = ("alg", "body_sha256", "body_bytes", "encryption")


def _reseal(keys: Keys, rng: random.Random, data: bytes, body: bytes | None = None,
            key: ed25519.Ed25519PrivateKey | None = None, **claim_edits: Any) -> bytes:
    """``data`` (a valid signed seed) signed again, with another body, key or claims; encrypted again if it was."""
    envelope, inner = _opened(keys, data)
    claims = {k: v for k, v in envelope.claims.items() if k not in DERIVED_CLAIMS}
    if body is not None:
        claims.update(_described(body, claims["format"]))
    claims.update(claim_edits)
    return signed.seal(inner if body is None else body, claims, key or keys.trusted,
                       aes_key=keys.aes if envelope.encrypted else None, nonce=rng.randbytes(signed.NONCE_BYTES))


def _described(body: bytes, format_name: str) -> dict[str, Any]:
    """The claims a server derives from a body it signs (as ``sign_bytes`` does), where the body still parses:
    an edited file signed again by its issuer carries claims that describe it."""
    try:
        if format_name == "lowra-adapter":
            blob = fmt.parse_blob(body)
            return {"subject": blob.adapter_id, "base_fingerprint": blob.base_fingerprint}
        base = parse_quantized_base(body)
    except Exception:  # a body that no longer parses keeps the old claims; the reader's run judges it
        return {}
    return {"subject": base.fingerprint, "base_fingerprint": base.fingerprint,
            "base_content": base.metadata["payload_sha256"]}


def _sign_raw(key: ed25519.Ed25519PrivateKey, claims: bytes, payload: bytes, flags: int = 0,
              kid: str | None = None, version: int = signed.ENVELOPE_VERSION, length: int | None = None) -> bytes:
    """An envelope built field by field (any claims bytes, flags or lengths), signed with ``key``: what
    :func:`signed.seal` refuses to make."""
    kid_bytes = bytes.fromhex(kid or signed.key_id(raw_public_key(key)))
    prefix = signed.PREFIX.pack(signed.MAGIC, version, flags, kid_bytes, len(claims) if length is None else length,
                                len(payload))
    message = prefix + claims + payload
    return message + key.sign(message)


def signed_mutations(keys: Keys, inner: tuple[Mutation, ...]) -> tuple[Mutation, ...]:
    """Every mutation of a signed seed: byte edits of the envelope, untrusted or forged signatures, claims edited in
    place or re-signed, and every ``inner`` mutation of the body re-signed with the trusted key."""

    def prefix_field(rng: random.Random, data: bytes) -> bytes:
        magic, version, flags, kid, length, payload_len = signed.PREFIX.unpack_from(data)
        choice = rng.randrange(4)
        if choice == 0:
            length = _pick(rng, [0, 1, length - 1, length + 1, signed.MAX_CLAIMS_BYTES + 1, (1 << 32) - 1])
        elif choice == 1:
            version = _pick(rng, [0, 2, 0xFFFF])
        elif choice == 2:
            flags = _pick(rng, [flags ^ 1, 2, 0x8000, 0xFFFF])
        else:
            kid = bytes(a ^ b for a, b in zip(kid, rng.randbytes(16)))
        return signed.PREFIX.pack(magic, version, flags, kid, length, payload_len) + data[signed.PREFIX.size :]

    def untrusted(rng: random.Random, data: bytes) -> bytes:
        return _reseal(keys, rng, data, key=keys.attacker)

    def forged_key_id(rng: random.Random, data: bytes) -> bytes:
        envelope, _ = _opened(keys, data)
        claims = signed.canonical_json(envelope.claims)
        flags = signed.FLAG_ENCRYPTED if envelope.encrypted else 0
        return _sign_raw(keys.attacker, claims, bytes(envelope.payload), flags, kid=keys.trusted_id)

    def stripped(rng: random.Random, data: bytes) -> bytes:
        return _opened(keys, data)[1]

    def claims_in_place(rng: random.Random, data: bytes) -> bytes:
        (length,) = struct.unpack_from("<I", data, 28)
        claims = data[40 : 40 + length]
        edited = _pick(rng, [claims.replace(b'"alice"', b'"mally"'), claims.replace(b'"sequence":5', b'"sequence":9'),
                             claims.replace(b"2026-11-29", b"2099-11-29")])
        return data[:28] + struct.pack("<I", len(edited)) + data[32:40] + edited + data[40 + length :]

    def claims_resigned(rng: random.Random, data: bytes) -> bytes:
        edits = [
            {"device_id": "another-phone"}, {"expires_at": "2026-11-28T00:00:00+00:00"},
            {"issued_at": "2027-01-01T00:00:00+00:00"}, {"issued_at": "yesterday"}, {"issued_at": "2026-11-29T12:00:00"},
            {"format_version": 1}, {"subject": "someone-else"}, {"base_fingerprint": "sha256:" + "1" * 64},
            {"base_content": "0" * 64}, {"expires_at": "2026-13-01T00:00:00+00:00"},
        ]
        envelope, _ = _opened(keys, data)
        if envelope.claims["format"] == "lowra-adapter":  # a base is bound to no user: only an adapter's can be wrong
            edits += [{"user_id": "mallory"}, {"user_id": None}, {"format": "lowra-base"}]
        else:
            edits += [{"format": "lowra-adapter"}]
        return _reseal(keys, rng, data, **_pick(rng, edits))

    def claims_raw(rng: random.Random, data: bytes) -> bytes:
        """Claims that :func:`signed.seal` would refuse (derived fields wrong, non-canonical, bad types), signed
        with the trusted key: the trusted key's owner made a mistake the device must still refuse."""
        envelope, _ = _opened(keys, data)
        claims = dict(envelope.claims)
        payload = bytes(envelope.payload)
        flags = signed.FLAG_ENCRYPTED if envelope.encrypted else 0
        choice = rng.randrange(9)
        raw = None
        if choice == 0:
            claims["body_bytes"] += _pick(rng, [1, -1, 1 << 60])
        elif choice == 1:
            claims["body_sha256"] = "0" * 64
        elif choice == 2:
            claims["sequence"] = _pick(rng, [0, -1, 1.5, "5", 1 << 53, True])
        elif choice == 3:
            claims["alg"] = "none"
        elif choice == 4:
            flags ^= signed.FLAG_ENCRYPTED
        elif choice == 5:
            claims["encryption"] = {"alg": "AES-256-GCM", "nonce": "00", "key_check": "00"}
        elif choice == 6:
            claims["extra"] = 1
        elif choice == 7:
            raw = json.dumps(claims).encode()  # not canonical
        else:
            raw = signed.canonical_json(claims)[:-1] + b',"user_id":"mallory"}'  # duplicate key
        return _sign_raw(keys.trusted, raw or json.dumps(claims, sort_keys=True, separators=(",", ":")).encode(),
                         payload, flags)

    def ciphertext_resigned(rng: random.Random, data: bytes) -> bytes:
        envelope, _ = _opened(keys, data)
        payload = bytearray(envelope.payload)
        payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
        flags = signed.FLAG_ENCRYPTED if envelope.encrypted else 0
        return _sign_raw(keys.trusted, signed.canonical_json(envelope.claims), bytes(payload), flags)

    def claims_legit(rng: random.Random, data: bytes) -> bytes:
        return _reseal(keys, rng, data, **_pick(rng, [{"sequence": SEQUENCE + 1},
                                                      {"expires_at": "2099-01-01T00:00:00+00:00"}]))

    def resigned(mutation: Mutation) -> Mutation:
        def mutate(rng: random.Random, data: bytes) -> bytes:
            return _reseal(keys, rng, data, body=mutation.apply(rng, _opened(keys, data)[1]))

        return Mutation(f"resigned/{mutation.name}", mutate, mutation.legit)

    return BYTE_MUTATIONS + (
        Mutation("envelope_prefix", prefix_field),
        Mutation("untrusted_key", untrusted),
        Mutation("forged_key_id", forged_key_id),
        Mutation("stripped_signature", stripped),
        Mutation("claims_in_place", claims_in_place),
        Mutation("claims_resigned", claims_resigned),
        Mutation("claims_raw", claims_raw),
        Mutation("ciphertext_resigned", ciphertext_resigned),
        Mutation("claims_legit", claims_legit, legit=True),
    ) + tuple(resigned(m) for m in inner)


# ----------------------------------------------------------------------------------------------- seeds
BASE_META = {"source": "fuzz", "group_size": 4, "scheme": {"method": "fuzz"}, "report": {},
             "created": "2026-01-01T00:00:00+00:00", "aliases": {"lm_head.weight": "model.embed_tokens.weight"}}


def random_layer(rng: np.random.Generator, out_f: int, in_f: int, group: int, grid: bool = False) -> QuantizedWeight:
    """A valid quantized weight from random widths, indices, sorted distinct levels and scales; with ``grid``, levels
    on version 4's integer grid: distinct k / (L + 1), k in -L..L, L its row's limit (31 on 1- and 2-bit rows, 127 on
    4-bit ones, whose levels then need their 8 bits)."""
    widths = rng.choice([1, 2, 4], out_f).astype(np.uint8)
    codes = np.concatenate([pack_codes(rng.integers(0, 1 << w, (1, in_f)).astype(np.uint8), int(w))[0] for w in widths])

    def values(w: int) -> np.ndarray:
        limit = level_limit(w)
        return np.arange(-limit, limit + 1) / (limit + 1) if grid else np.linspace(-1, 1, 64)

    levels = np.concatenate([np.sort(rng.choice(values(int(w)), 1 << w, replace=False)) for w in widths])
    n_groups = -(-in_f // group) if group else 0
    scales = rng.uniform(0.1, 2, (out_f, n_groups)).astype(np.float16)
    return QuantizedWeight(out_f, in_f, group, widths, codes, levels.astype(np.float16), scales)


def base_seed_bytes(seed: int = 0, codebook_format: str = "float16") -> bytes:
    """A tiny quantized base: version 1, or version 4 (levels on the integer grid) with ``codebook_format="int"``."""
    rng = np.random.default_rng(seed)
    grid = codebook_format == "int"
    layers = {"model.layers.0.self_attn.q_proj": random_layer(rng, 6, 10, 4, grid),
              "model.layers.0.mlp.down_proj": random_layer(rng, 5, 7, 0, grid)}
    dense = {"model.embed_tokens.weight": rng.standard_normal((12, 10)).astype(np.float16),
             "model.norm.weight": np.ones(10, np.float16),
             "model.layers.0.input_layernorm.weight": np.ones(10, np.float16)}
    return build_quantized_base_bytes(layers, dense, BASE_META, codebook_format=codebook_format)


def _distinct_blob(base_dir: Path, **kw: Any) -> bytes:
    """A seed blob whose every codebook has distinct levels (so reversing one always unsorts it)."""
    for seed in range(1, 100):
        data = make_blob_bytes(base_dir, seed=seed, **kw)
        blob = fmt.parse_blob(data)
        starts = blob.layout.level_offsets
        if all(np.all(np.diff(blob.codebooks[starts[c] : starts[c + 1]]) > 0) for c in range(blob.layout.n_channels)):
            return data
    raise AssertionError("no seed with distinct levels")


# ----------------------------------------------------------------------------------------------- classification
class _Abort(BaseException):
    """Raised by the alarm in a reader that runs past ABORT_SECONDS (a BaseException: readers cannot catch it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Abort


def _arrays_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_arrays_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_arrays_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return type(a) is type(b) and a == b


def _claims(claims: dict[str, Any] | None) -> dict[str, Any] | None:
    """Claims as the issuer chose them: without the fields derived from the body (its digest, length, and the
    encryption nonce), so a body re-signed after a meaning-preserving edit still counts as the same file."""
    return None if claims is None else {k: v for k, v in claims.items() if k not in DERIVED_CLAIMS}


class FuzzContext:
    """The tiny base, keys, seeds and mutations, and the reader each seed goes through.

    ``workdir`` holds the tiny numpy base and one scratch file per base input (use /dev/shm: no disk I/O).
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.base_dir = write_base(self.workdir / "numpy-base")
        self.base = BaseWeights(self.base_dir)
        self.base.precompute_digests()
        self.keys = Keys()
        blob = _distinct_blob(self.base_dir, adapter_id="alice-adapter")
        small = _distinct_blob(self.base_dir, rank=1, widths=(1,), adapter_id="alice-small",
                               modules={"model.layers.0.self_attn.q_proj": (24, 16)})
        base = base_seed_bytes()
        sign = {"user_id": USER, "now": NOW, "sequence": SEQUENCE, "expires_in": dt.timedelta(days=30)}
        self.seeds = {
            "blob": Seed("blob", "blob", blob),
            "blob-small": Seed("blob-small", "blob", small),
            "blob-signed": Seed("blob-signed", "blob", sign_bytes(blob, self.keys.trusted, **sign), signed=True),
            "blob-encrypted": Seed("blob-encrypted", "blob", sign_bytes(
                small, self.keys.trusted, encryption_key=self.keys.aes, **sign), signed=True, encrypted=True),
            "base": Seed("base", "base", base),
            "base-signed": Seed("base-signed", "base", sign_bytes(base, self.keys.trusted, now=NOW, sequence=SEQUENCE),
                                signed=True),
            "base-int": Seed("base-int", "base", base_seed_bytes(codebook_format="int")),  # version 4
        }
        unsigned = {"blob": blob_mutations(self.base), "base": base_mutations()}
        self._mutations = {
            name: signed_mutations(self.keys, unsigned[s.family]) if s.signed else unsigned[s.family]
            for name, s in self.seeds.items()
        }
        self.expected: dict[str, Any] = {}
        self.largest_valid = {"blob": 0, "base": 0}
        self.valid_peak = {"blob": 1 << 62, "base": 1 << 62}  # unbounded while the seeds themselves are measured
        peaks = {"blob": 0, "base": 0}
        for s in self.seeds.values():
            self.expected[s.name] = self._read(s, s.data)  # warms imports and caches, then measures
            result = self.classify(s, s.data, Mutation("none", lambda rng, d: d))
            if result.outcome != SAME:
                raise AssertionError(f"seed {s.name} is not accepted as itself: {result}")
            peaks[s.family] = max(peaks[s.family], result.peak_bytes)
            self.largest_valid[s.family] = max(self.largest_valid[s.family], len(s.data))
        self.valid_peak = peaks

    def mutations(self, seed: Seed) -> tuple[Mutation, ...]:
        return self._mutations[seed.name]

    def cases(self) -> list[tuple[Seed, Mutation]]:
        return [(s, m) for s in self.seeds.values() for m in self.mutations(s)]

    def policy(self, seed: Seed) -> TrustPolicy:
        """A fresh policy per input (its replay store empty): pinned trusted key for signed seeds, unsigned allowed
        for the others."""
        if seed.signed:
            return TrustPolicy(trusted_keys={self.keys.trusted_id: raw_public_key(self.keys.trusted)},
                               sequences=SequenceStore(), clock=lambda: NOW)
        return TrustPolicy(allow_unsigned=True, sequences=SequenceStore(), clock=lambda: NOW)

    def memory_bound(self, seed: Seed, data: bytes) -> int:
        """Peak bytes a reader may allocate for ``data``: what the family's valid seeds cost, plus
        :data:`MEMORY_FACTOR` times the larger of the input and the largest valid file (memory tracks the file,
        never what a header announces), plus :data:`MEMORY_SLACK`."""
        family = seed.family
        return self.valid_peak[family] + MEMORY_FACTOR * max(len(data), self.largest_valid[family]) + MEMORY_SLACK

    def _load(self, seed: Seed, data: bytes) -> Callable[[], Any]:
        """The call the device makes (what is timed and measured) and, after it, a reader of the accepted content."""
        key = self.keys.aes if seed.encrypted else None
        if seed.family == "blob":
            runtime = DeviceRuntime(self.base, trust=self.policy(seed))

            def load() -> Any:
                runtime.load_user(data, user_id=USER, decryption_key=key)
                return runtime

            return load
        path = self.workdir / "input.safetensors"
        path.unlink(missing_ok=True)  # a new file each time: an earlier input's memory map keeps its own bytes
        path.write_bytes(data)
        policy = self.policy(seed)
        return lambda: open_quantized_base(path, policy)

    def _content(self, seed: Seed, data: bytes, loaded: Any) -> Any:
        """What an accepted input decodes to, in full: metadata, claims, every decoded tensor."""
        if seed.family == "blob":
            blob = open_blob(data, self.policy(seed), user_id=USER, decryption_key=self.keys.aes if seed.encrypted else None)
            return (blob.metadata, _claims(blob.claims), blob.all_factors(), dict(loaded.snapshot().merged))
        layers = {n: (w.out_features, w.in_features, w.group_size, w.widths, w.codes, w.codebooks, w.scales)
                  for n, w in loaded.layers.items()}
        return (loaded.metadata, _claims(loaded.claims), layers, dict(loaded.dense), loaded.aliases, loaded.fingerprint)

    def _read(self, seed: Seed, data: bytes) -> Any:
        load = self._load(seed, data)
        return self._content(seed, data, load())

    def classify(self, seed: Seed, data: bytes, mutation: Mutation) -> Result:
        """Run the device's reader on ``data`` (a mutation of ``seed``) and name the outcome."""
        load = self._load(seed, data)
        tracing = tracemalloc.is_tracing()
        if not tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base_memory = tracemalloc.get_traced_memory()[0]
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(ABORT_SECONDS)
        start = time.perf_counter()
        loaded, error, trace, aborted = None, None, "", False
        try:
            loaded = load()
        except _Abort:
            aborted = True
        except Exception as exc:  # classified below: LowraError is a refusal, anything else a bug
            error = exc
        finally:
            seconds = time.perf_counter() - start
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            peak = tracemalloc.get_traced_memory()[1] - base_memory
            if not tracing:
                tracemalloc.stop()
        if error is not None:  # after the measurement: a first traceback reads its files' source into linecache
            trace = "".join(traceback.format_exception(error)[-4:])
        message = f"{type(error).__name__}: {error}" if error is not None else ""
        if aborted or seconds > HANG_SECONDS:
            outcome = HANG
        elif error is not None and not isinstance(error, LowraError):
            outcome = FOREIGN
        elif peak > self.memory_bound(seed, data):
            outcome = MEMORY
        elif error is not None:
            text = str(error)
            outcome = BAD_MESSAGE if "\n" in text or len(text) > MAX_MESSAGE_CHARS else REFUSED
            message = message[:MAX_MESSAGE_CHARS]
        else:
            try:
                same = _arrays_equal(self._content(seed, data, loaded), self.expected[seed.name])
            except Exception as exc:  # accepted once, then refused or crashed on a second read: not deterministic
                same, message = False, f"{type(exc).__name__} on a second read: {exc}"[:MAX_MESSAGE_CHARS]
                trace = "".join(traceback.format_exception(exc)[-4:])
            outcome = SAME if same else VALID_EDIT if mutation.legit else CHANGED
        return Result(outcome, seconds, peak, message, trace)

    def run(self, seed: Seed, mutation: Mutation, rng_seed: int) -> tuple[bytes, Result]:
        """Mutate ``seed`` with ``mutation`` under ``random.Random(rng_seed)`` and classify the result."""
        data = mutation.apply(random.Random(rng_seed), seed.data)
        return data, self.classify(seed, data, mutation)
