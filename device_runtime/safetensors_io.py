"""Minimal safetensors reading and atomic writing with numpy only.

We parse the container ourselves (8-byte little-endian header length, JSON header, raw data) so that a
truncated or corrupted file gets a precise error, and so base weights can be memory-mapped read-only:
the file on disk *is* the pristine copy of the base, which is what makes user swaps drift-free.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import BlobContentError, BlobError, BlobTruncatedError

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


def parse_header(raw: bytes | memoryview, file_size: int, what: str) -> Header:
    """Parse and validate a safetensors header from the first bytes of a file of ``file_size`` bytes."""
    if file_size < 8 or len(raw) < 8:
        raise BlobTruncatedError(f"{what}: {file_size} bytes is too short for a safetensors file (needs >= 8)")
    (n,) = struct.unpack("<Q", bytes(raw[:8]))
    if n > MAX_HEADER_BYTES:
        raise BlobError(f"{what}: header length {n} is implausible (max {MAX_HEADER_BYTES}); not a safetensors file")
    if 8 + n > file_size or 8 + n > len(raw):
        raise BlobTruncatedError(
            f"{what}: header announces {n} bytes of JSON but the file has only {file_size - 8} after the length field; "
            "the file is truncated"
        )
    try:
        header = json.loads(bytes(raw[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BlobError(f"{what}: safetensors header is not valid JSON ({exc}); the file is corrupted") from exc
    if not isinstance(header, dict):
        raise BlobError(f"{what}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BlobError(f"{what}: __metadata__ must map strings to strings")
    data_offset = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise BlobError(f"{what}: tensor {name!r} has a malformed header entry {info!r}") from exc
        if dtype not in DTYPES:
            raise BlobContentError(f"{what}: tensor {name!r} has dtype {dtype}, expected one of {sorted(DTYPES)}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise BlobError(
                f"{what}: tensor {name!r} spans {end - begin} bytes but dtype {dtype} shape {list(shape)} needs {expected}"
            )
        if data_offset + end > file_size:
            raise BlobTruncatedError(
                f"{what}: tensor {name!r} ends at byte {data_offset + end} but the file has {file_size} bytes; "
                "the file is truncated"
            )
        tensors[name] = TensorInfo(name, dtype, shape, data_offset + begin, data_offset + end)
    return Header(tensors=tensors, metadata=dict(metadata), data_offset=data_offset, header_bytes=data_offset)


def read_header(path: Path) -> Header:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if n <= MAX_HEADER_BYTES:
                head += fh.read(n)
    return parse_header(head, size, str(path))


def tensor_from_buffer(buffer: bytes | memoryview | np.ndarray, info: TensorInfo) -> np.ndarray:
    """A read-only view of one tensor inside ``buffer`` (the whole file's bytes or a memmap)."""
    flat = np.frombuffer(buffer, dtype=np.uint8, count=info.end - info.start, offset=info.start)
    return flat.view(DTYPES[info.dtype]).reshape(info.shape)


def memmap_tensors(path: Path) -> tuple[Header, dict[str, np.ndarray]]:
    """Map every tensor of a safetensors file read-only; nothing is copied into RAM until touched."""
    header = read_header(path)
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A crash leaves either the old file or the new one under ``path``, never a half-written one.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; expected a file path for the blob")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
