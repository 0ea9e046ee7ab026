"""The container every lowra file uses: safetensors (numpy only) plus lowra's metadata envelope.

We parse the container ourselves (8-byte little-endian header length, JSON header, raw data) so that a
truncated or corrupted file gets a precise error, and so base weights can be memory-mapped read-only:
the file on disk *is* the pristine copy of the base, which is what makes user swaps drift-free.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from lowra.device_runtime.errors import (
    BlobContentError,
    BlobError,
    BlobTruncatedError,
    ChecksumMismatchError,
    UnsupportedFormatError,
)

# safetensors dtype names -> numpy dtypes (BF16 is widened on read; numpy has no bfloat16).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "BF16": np.dtype("<u2"),
}
_NUMPY_TO_NAME = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}

# A header larger than this is not a file we wrote or a sane model file; refuse before allocating.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int
    header_bytes: int  # 8 + JSON length: the container's own overhead


@dataclass(frozen=True)
class Limits:
    """Bounds a reader enforces before it allocates anything a file announces.

    ``max_header_bytes`` caps the JSON header (the one allocation that depends on the file before validation);
    ``max_tensors`` the entries in it; ``max_data_bytes`` the tensor data a file may declare. The defaults fit
    any model file safetensors itself accepts; each lowra format passes tighter ones (an adapter blob's header is
    a few KB).
    """

    max_header_bytes: int = MAX_HEADER_BYTES
    max_tensors: int = 1_000_000
    max_data_bytes: int = 1 << 40
    max_name_bytes: int = 1024


DEFAULT_LIMITS = Limits()
MAX_DIMS = 8
MAX_DIM = 1 << 40


def short(value: object, limit: int = 60) -> str:
    """A repr cut to ``limit`` characters, so no input can make an error message large."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short(key)}")
        out[key] = value
    return out


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"number {short(text)} overflows to infinity")
    return value


MAX_JSON_DEPTH = 64  # no lowra file nests deeper than a few levels; liblowra applies the same limit


def _too_deep(value: object, limit: int) -> bool:
    """Whether ``value`` nests lists/objects more than ``limit`` levels (iterative: no recursion of its own)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def strict_json(text: str) -> object:
    """``json.loads`` that refuses duplicate keys, NaN/Infinity, numbers that overflow to infinity and nesting
    deeper than MAX_JSON_DEPTH (raises ValueError, or RecursionError past the interpreter's limit, which also
    bounds what absurd nesting can allocate): what every lowra reader parses JSON with."""
    value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite_float)
    if _too_deep(value, MAX_JSON_DEPTH):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def check_name(name: object, what: str, field: str, max_bytes: int = 1024) -> str:
    """A tensor or metadata name: a printable string of valid UTF-8 (no lone surrogates), within ``max_bytes``."""
    if not isinstance(name, str):
        raise BlobError(f"{what}: {field} {short(name)} is not a string")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise BlobError(f"{what}: {field} {short(name)} is not valid UTF-8 (lone surrogate)") from None
    if not name or size > max_bytes or not name.isprintable():
        raise BlobError(f"{what}: {field} {short(name)} must be 1..{max_bytes} bytes of printable text")
    return name


def module_entries(value: object, what: str, fields: str) -> list[tuple[str, int, int, int]]:
    """A ``modules`` metadata table, strictly: a non-empty list of ``[name, int, int, int]`` (``fields`` names them
    for messages, e.g. "name, out, in, rank"), each name a printable string that appears once."""
    if not isinstance(value, list) or not value:
        raise BlobContentError(f"{what}: metadata 'modules' must be a non-empty list of [{fields}]")
    out: list[tuple[str, int, int, int]] = []
    seen: set[str] = set()
    for entry in value:
        if (not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[0], str)
                or any(type(v) is not int for v in entry[1:])):
            raise BlobContentError(f"{what}: module entry {short(entry)} is not [{fields}] with integer sizes")
        name = check_name(entry[0], what, "module name", 512)
        if name in seen:
            raise BlobContentError(f"{what}: module {name!r} appears twice; each module is listed once")
        seen.add(name)
        out.append((name, entry[1], entry[2], entry[3]))
    return out


def _int(value: object, low: int, high: int, what: str, field: str) -> int:
    if type(value) is not int or not low <= value <= high:  # bool is not an int here; floats are refused
        raise BlobError(f"{what}: {field} is {short(value)}, expected an integer in [{low}, {high}]")
    return value


def parse_header(raw: bytes | memoryview, file_size: int, what: str, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse and validate a safetensors header from the first bytes of a file of ``file_size`` bytes.

    Strict: the JSON is an object without duplicate keys or NaN/Infinity; every tensor entry has exactly
    ``dtype`` (a known name), ``shape`` (at most 8 non-negative integer dims) and ``data_offsets`` (two integers);
    the data ranges, sorted, tile the data section exactly from its first byte to the end of the file (no gap,
    overlap or trailing byte); names and metadata are printable UTF-8 strings. Every bound in ``limits`` is checked
    before the header is decoded or a tensor is touched, and every message is one short line.
    """
    if file_size < 8 or len(raw) < 8:
        raise BlobTruncatedError(f"{what}: {file_size} bytes is too short for a safetensors file (needs >= 8)")
    (n,) = struct.unpack("<Q", bytes(raw[:8]))
    if n > limits.max_header_bytes:
        raise BlobError(f"{what}: header length {n} exceeds the limit of {limits.max_header_bytes} bytes")
    if 8 + n > file_size or 8 + n > len(raw):
        raise BlobTruncatedError(
            f"{what}: header announces {n} bytes of JSON but the file has only {file_size - 8} after the length field; "
            "the file is truncated"
        )
    try:
        header = strict_json(bytes(raw[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BlobError(f"{what}: safetensors header is not valid JSON ({short(str(exc), 120)}); the file is corrupted") from None
    if not isinstance(header, dict):
        raise BlobError(f"{what}: safetensors header must be a JSON object, not {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise BlobError(f"{what}: __metadata__ must be an object mapping strings to strings")
    for key, value in metadata.items():
        check_name(key, what, "metadata key", limits.max_name_bytes)
        if not isinstance(value, str):
            raise BlobError(f"{what}: metadata {short(key)} is {type(value).__name__}, expected a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BlobError(f"{what}: metadata {short(key)} is not valid UTF-8 (lone surrogate)") from None
    if len(header) > limits.max_tensors:
        raise BlobError(f"{what}: {len(header)} tensors exceed the limit of {limits.max_tensors}")
    data_offset = 8 + n
    data_size = file_size - data_offset
    if data_size > limits.max_data_bytes:
        raise BlobError(f"{what}: {data_size} bytes of tensor data exceed the limit of {limits.max_data_bytes}")
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        check_name(name, what, "tensor name", limits.max_name_bytes)
        if not isinstance(info, dict) or sorted(info) != ["data_offsets", "dtype", "shape"]:
            raise BlobError(f"{what}: tensor {short(name)} entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise BlobContentError(f"{what}: tensor {short(name)} has dtype {short(dtype)}, expected one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS:
            raise BlobError(f"{what}: tensor {short(name)} shape must be a list of at most {MAX_DIMS} integers")
        dims = tuple(_int(d, 0, MAX_DIM, what, f"tensor {short(name)} dimension") for d in shape)
        if math.prod(max(d, 1) for d in dims) > MAX_DIM:  # numpy refuses such shapes even when one dim is 0
            raise BlobError(f"{what}: tensor {short(name)} shape {short(list(dims))} is larger than any tensor can be")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise BlobError(f"{what}: tensor {short(name)} data_offsets must be [begin, end]")
        begin = _int(offsets[0], 0, limits.max_data_bytes, what, f"tensor {short(name)} begin offset")
        end = _int(offsets[1], begin, limits.max_data_bytes, what, f"tensor {short(name)} end offset")
        if end > data_size:
            raise BlobTruncatedError(
                f"{what}: tensor {short(name)} ends at byte {data_offset + end} but the file has {file_size} bytes; "
                "the file is truncated"
            )
        expected = math.prod(dims) * DTYPES[dtype].itemsize  # Python ints: no wrap-around
        if end - begin != expected:
            raise BlobError(
                f"{what}: tensor {short(name)} spans {end - begin} bytes but dtype {dtype} shape {list(dims)} needs {expected}"
            )
        tensors[name] = TensorInfo(name, dtype, dims, data_offset + begin, data_offset + end)
    position = data_offset
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            kind = "overlaps the previous tensor" if info.start < position else "leaves a gap before it"
            raise BlobError(f"{what}: tensor {short(info.name)} starts at byte {info.start} and {kind}")
        position = info.end
    if position != file_size:
        raise BlobError(
            f"{what}: tensor data ends at byte {position} but the file has {file_size} bytes; trailing bytes are refused"
        )
    return Header(tensors=tensors, metadata=dict(metadata), data_offset=data_offset, header_bytes=data_offset)


def read_header(path: Path, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Read and validate the header of the safetensors file at ``path`` (reads at most ``limits`` bytes of it)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if n <= limits.max_header_bytes and 8 + n <= size:  # never let the announced length size a read
                head += fh.read(n)
    return parse_header(head, size, str(path), limits)


def tensor_from_buffer(buffer: bytes | memoryview | np.ndarray, info: TensorInfo) -> np.ndarray:
    """A read-only view of one tensor inside ``buffer`` (the whole file's bytes or a memmap)."""
    flat = np.frombuffer(buffer, dtype=np.uint8, count=info.end - info.start, offset=info.start)
    return flat.view(DTYPES[info.dtype]).reshape(info.shape)


def memmap_tensors(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[Header, dict[str, np.ndarray]]:
    """Map every tensor of a safetensors file read-only; nothing is copied into RAM until touched."""
    header = read_header(path, limits)
    if header.data_offset == path.stat().st_size:  # no tensor data at all: np.memmap refuses empty maps
        return header, {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    return header, {name: tensor_from_buffer(mm, info) for name, info in header.tensors.items()}


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype (what :func:`serialize` writes for it)."""
    dtype = np.dtype(dtype)
    name = _NUMPY_TO_NAME.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if name is None:
        raise BlobContentError(f"numpy dtype {dtype} has no safetensors equivalent")
    return name


def _header(entries: Mapping[str, tuple[str, tuple[int, ...], int]], metadata: Mapping[str, str]) -> bytes:
    """The length-prefixed, 8-byte padded JSON header for tensors given as name -> (dtype, shape, nbytes)."""
    table: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(entries):
        dtype, shape, nbytes = entries[name]
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the safetensors convention: data starts 8-byte aligned
    return struct.pack("<Q", len(header)) + header


def header_size(entries: Mapping[str, tuple[str, tuple[int, ...], int]], metadata: Mapping[str, str]) -> int:
    """Bytes :func:`serialize` spends before the tensor data (for exact budget accounting ahead of time)."""
    return len(_header(entries, metadata))


def serialize(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes with tensors in sorted-name order (deterministic output for identical input)."""
    entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
    blobs: list[bytes] = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        little = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        dtype = _NUMPY_TO_NAME.get(little)
        if dtype is None:
            raise BlobContentError(f"tensor {name!r}: numpy dtype {arr.dtype} has no safetensors equivalent")
        data = arr.astype(little, copy=False).tobytes()
        entries[name] = (dtype, arr.shape, len(data))
        blobs.append(data)
    return _header(entries, metadata) + b"".join(blobs)


# ----------------------------------------------------------------------------------------------- envelope
# Every lowra safetensors file carries ``format``, ``format_version``, a ``payload_sha256`` over its tensors
# and other metadata, and some JSON-valued metadata keys. Writers and readers of each format share these helpers.

def payload_digest(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes; sorted by name) and every metadata entry but itself."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}|".encode())
        h.update(arr.tobytes())
    rest = {k: v for k, v in metadata.items() if k != "payload_sha256"}
    h.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()


def encode_metadata(metadata: Mapping[str, object], json_keys: Sequence[str]) -> dict[str, str]:
    """The string map ``__metadata__`` stores: keys in ``json_keys`` as compact sorted JSON, the rest as ``str``."""
    return {
        k: (json.dumps(v, separators=(",", ":"), sort_keys=True) if k in json_keys else str(v))
        for k, v in metadata.items()
    }


def check_envelope(
    meta: Mapping[str, str], *, what: str, format_name: str, reads: Sequence[int], required: Sequence[str],
    not_this: str, remedy: str,
) -> int:
    """Refuse a file that is not ``format_name`` in a version this reader knows, or lacks required keys.

    ``not_this`` finishes the wrong-format message (what the file is not); ``remedy`` says what to do about an
    unsupported version. Returns the version.
    """
    if meta.get("format") != format_name:
        raise UnsupportedFormatError(f"{what}: format is {meta.get('format')!r}, expected {format_name!r}; {not_this}")
    text = meta.get("format_version", "")
    version = int(text) if text in {str(v) for v in reads} else -1  # exactly "1", not " 1", "01" or "+1"
    if version not in reads:
        raise UnsupportedFormatError(
            f"{what}: format version {meta.get('format_version')!r} is not supported; this runtime reads versions "
            f"{list(reads)}. Upgrade lowra on the device or {remedy}"
        )
    missing = [k for k in required if k not in meta]
    if missing:
        raise BlobContentError(f"{what}: metadata lacks required keys {missing}")
    return version


def verify_payload(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str], what: str, remedy: str) -> None:
    """Compare the payload digest with the stored ``payload_sha256``; ``remedy`` says what to do on a mismatch."""
    digest = payload_digest(tensors, meta)
    if digest != meta["payload_sha256"]:
        raise ChecksumMismatchError(
            f"{what}: payload sha256 is {digest[:16]}..., the file says {meta['payload_sha256'][:16]}...; "
            f"the file is corrupted or was modified after writing. {remedy}"
        )


def decode_json_metadata(meta: Mapping[str, str], json_keys: Sequence[str], what: str) -> dict[str, object]:
    """``meta`` with the values of ``json_keys`` decoded from JSON, strictly (no duplicate keys, no NaN/Infinity,
    bounded nesting, canonical spelling); a malformed one is a BlobContentError."""
    decoded: dict[str, object] = dict(meta)
    for key in json_keys:
        try:
            decoded[key] = strict_json(meta[key])
        except (ValueError, RecursionError) as exc:
            raise BlobContentError(f"{what}: metadata {key!r} is not valid JSON ({short(str(exc), 120)})") from None
        # One spelling per value: what encode_metadata writes. Another spelling of the same value (spaces, key
        # order, escapes) is a file no lowra writer made, so it is refused rather than silently normalized.
        if encode_metadata({key: decoded[key]}, [key])[key] != meta[key]:
            raise BlobContentError(f"{what}: metadata {key!r} is not in canonical JSON form (compact, sorted keys)")
    return decoded
