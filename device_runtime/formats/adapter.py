"""The lowra adapter blob, format v1: the single source of truth (spec in docs/FORMAT.md).

A user blob is a safetensors file holding a LoRA delta ``dW = up @ down`` per target module, re-factored by
SVD into ``rank`` components ordered by importance. Every component k of a module has two *channels*:
``down[k, :]`` (length ``in_features``) and ``up[:, k]`` (length ``out_features``). Each channel has its own
width ``w`` in {0, 1, 2, 4} bits and, when ``w > 0``, its own learned codebook of ``2**w`` float16 levels
(ascending); each element is stored as a ``w``-bit index into that codebook. Width 0 means the channel is
dropped (decodes to zeros). The LoRA scaling is folded into ``up``.

Tensors (all one-dimensional, concatenated over channels in *channel order*):
  ``codes``      uint8   packed indices; each channel starts on a byte boundary and is packed LSB-first:
                         element j sits at bits ``(j*w) % 8`` of byte ``(j*w) // 8`` of the channel. This is
                         ONNX Runtime MatMulNBits' packing along the reduction axis, so exports need no repacking.
  ``codebooks``  float16 ``2**w`` levels per channel with ``w > 0``.
  ``widths``     uint8   the bit map: one 2-bit width code per channel, packed LSB-first like codes
                         (code 0/1/2/3 -> width 0/1/2/4).
Channel order: modules in the order of the ``modules`` metadata list; within a module the ``rank`` down
channels (k = 0..rank-1) then the ``rank`` up channels.

``__metadata__`` (string -> string; JSON-encoded where noted): see :data:`REQUIRED_METADATA`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from lowra.device_runtime.errors import BlobContentError, BlobError
from lowra.device_runtime.formats.bitpack import decode_widths, encode_widths, pack_codes, packed_bytes, unpack_codes
from lowra.device_runtime.formats.constants import (
    ADAPTER_FORMAT as FORMAT_NAME,
    ADAPTER_READS as SUPPORTED_VERSIONS,
    ADAPTER_VERSION as FORMAT_VERSION,
    ADAPTER_WIDTHS,
    CODED_WIDTHS,
)
from lowra.device_runtime.formats.container import (
    Limits,
    short,
    check_envelope,
    decode_json_metadata,
    encode_metadata,
    header_size,
    module_entries,
    parse_header,
    payload_digest,
    serialize,
    tensor_from_buffer,
    verify_payload,
)

CODEBOOK_DTYPE = np.dtype("<f2")
TENSOR_NAMES = ("codebooks", "codes", "widths")

# Metadata keys every v1 blob carries. JSON-valued keys are decoded by read_blob.
REQUIRED_METADATA = (
    "format",  # "lowra-adapter"
    "format_version",  # "1"
    "adapter_id",  # free text id of the user/adapter
    "base_fingerprint",  # "sha256:<hex>" over the targeted base weights, see base_fingerprint()
    "lora",  # JSON {"rank", "alpha", "targets", "scaling"}; scaling is already folded into up
    "modules",  # JSON [[module_path, out_features, in_features, rank], ...] in channel order
    "scheme",  # JSON description of how the codes were made (budget, widths, method); informative
    "payload_sha256",  # hex sha256 over tensors and all other metadata, see payload_digest()
    "created",  # ISO-8601 UTC time of writing
    "card",  # JSON adapter card: task, data summary, held-out results
)
JSON_METADATA = ("lora", "modules", "scheme", "card")


# ----------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ModuleEntry:
    name: str
    out_features: int
    in_features: int
    rank: int

    @property
    def n_params(self) -> int:
        """Parameters of the fp adapter this entry replaces (LoRA A and B)."""
        return self.rank * (self.in_features + self.out_features)

    def channel_lengths(self) -> np.ndarray:
        return np.array([self.in_features] * self.rank + [self.out_features] * self.rank, dtype=np.int64)


@dataclass(frozen=True)
class Layout:
    """Where each channel's codes and codebook live; derived from the module table and widths only."""

    modules: tuple[ModuleEntry, ...]
    widths: np.ndarray  # uint8 [channels]
    lengths: np.ndarray  # int64 [channels]
    code_offsets: np.ndarray  # int64 [channels + 1] into codes
    level_offsets: np.ndarray  # int64 [channels + 1] into codebooks
    module_offsets: np.ndarray  # int64 [modules + 1] into channels

    @classmethod
    def build(cls, modules: Iterable[ModuleEntry], widths: np.ndarray) -> "Layout":
        modules = tuple(modules)
        lengths = (
            np.concatenate([m.channel_lengths() for m in modules]) if modules else np.zeros(0, dtype=np.int64)
        )
        widths = np.asarray(widths, dtype=np.uint8)
        if widths.shape != lengths.shape:
            raise BlobContentError(f"{widths.size} channel widths for {lengths.size} channels (2 x rank per module)")
        code_sizes = (lengths * widths + 7) // 8
        level_sizes = np.where(widths > 0, 1 << widths.astype(np.int64), 0)
        per_module = np.array([2 * m.rank for m in modules], dtype=np.int64)
        cum = lambda a: np.concatenate([[0], np.cumsum(a, dtype=np.int64)])  # noqa: E731
        return cls(modules, widths, lengths, cum(code_sizes), cum(level_sizes), cum(per_module))

    @property
    def n_channels(self) -> int:
        return int(self.lengths.size)

    @property
    def n_code_bytes(self) -> int:
        return int(self.code_offsets[-1])

    @property
    def n_levels(self) -> int:
        return int(self.level_offsets[-1])

    @property
    def n_params(self) -> int:
        return int(sum(m.n_params for m in self.modules))

    def code_bits(self) -> int:
        """Bits of the indices alone (no padding, codebooks or metadata): the 'code bits' beside effective bits."""
        return int(np.sum(self.lengths * self.widths))


def encode_channels(layout: Layout, codes: list[np.ndarray], levels: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Pack per-channel codes (uint8 [L]) and levels ([2**w]) into the three blob tensors."""
    code_buf = np.zeros(layout.n_code_bytes, dtype=np.uint8)
    level_buf = np.zeros(layout.n_levels, dtype=CODEBOOK_DTYPE)
    for c in range(layout.n_channels):
        w = int(layout.widths[c])
        if w == 0:
            continue
        code_buf[layout.code_offsets[c] : layout.code_offsets[c + 1]] = pack_codes(codes[c][None, :], w)[0]
        level_buf[layout.level_offsets[c] : layout.level_offsets[c + 1]] = levels[c]
    return {"codes": code_buf, "codebooks": level_buf, "widths": encode_widths(layout.widths)}


def decode_channel_group(
    layout: Layout, codes: np.ndarray, codebooks: np.ndarray, channels: np.ndarray, length: int
) -> np.ndarray:
    """Decode channels of equal length to float32 [len(channels), length], vectorized per width."""
    out = np.zeros((channels.size, length), dtype=np.float32)
    widths = layout.widths[channels]
    for w in CODED_WIDTHS:
        rows = np.nonzero(widths == w)[0]
        if rows.size == 0:
            continue
        chans = channels[rows]
        nbytes = packed_bytes(length, w)
        packed = codes[layout.code_offsets[chans][:, None] + np.arange(nbytes)[None, :]]
        idx = unpack_codes(packed, w, length).astype(np.int64)
        out[rows] = codebooks[layout.level_offsets[chans][:, None] + idx]
    return out


# ----------------------------------------------------------------------------------------------- blobs
@dataclass
class Blob:
    """A parsed, verified user blob. ``factors(name)`` decodes one module with the numpy reference codec."""

    metadata: dict[str, object]
    layout: Layout
    codes: np.ndarray
    codebooks: np.ndarray  # float32 copy of the float16 levels
    file_bytes: int
    header_bytes: int
    _by_name: dict[str, int] = field(default_factory=dict, repr=False)
    claims: dict[str, object] | None = None  # the verified signed claims, when the blob came signed

    def __post_init__(self) -> None:
        self._by_name = {m.name: i for i, m in enumerate(self.layout.modules)}

    @property
    def adapter_id(self) -> str:
        return str(self.metadata["adapter_id"])

    @property
    def base_fingerprint(self) -> str:
        return str(self.metadata["base_fingerprint"])

    @property
    def modules(self) -> tuple[ModuleEntry, ...]:
        return self.layout.modules

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(up float32 [out, rank], down float32 [rank, in]) with ``delta = up @ down`` (scaling folded in)."""
        i = self._by_name[name]
        m = self.layout.modules[i]
        first = int(self.layout.module_offsets[i])
        down = decode_channel_group(
            self.layout, self.codes, self.codebooks, np.arange(first, first + m.rank), m.in_features
        )
        up_t = decode_channel_group(
            self.layout, self.codes, self.codebooks, np.arange(first + m.rank, first + 2 * m.rank), m.out_features
        )
        return np.ascontiguousarray(up_t.T), down

    def all_factors(self, drop_empty: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every module's (up, down) at once, decoded in one vectorized pass per channel length and width.

        With ``drop_empty``, components whose down or up channel has width 0 are left out (their product is
        zero), so a merge multiplies only the components that carry information.
        """
        lay = self.layout
        decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for length in np.unique(lay.lengths):
            chans = np.nonzero(lay.lengths == length)[0]
            decoded[int(length)] = (chans, decode_channel_group(lay, self.codes, self.codebooks, chans, int(length)))
        out = {}
        for i, m in enumerate(lay.modules):
            first = int(lay.module_offsets[i])
            parts = []
            for start, length in ((first, m.in_features), (first + m.rank, m.out_features)):
                chans, values = decoded[length]
                pos = int(np.searchsorted(chans, start))
                parts.append(values[pos : pos + m.rank])
            down, up_t = parts
            if drop_empty:
                keep = (lay.widths[first : first + m.rank] > 0) & (lay.widths[first + m.rank : first + 2 * m.rank] > 0)
                down, up_t = down[keep], up_t[keep]
            out[m.name] = (np.ascontiguousarray(up_t.T), np.ascontiguousarray(down))
        return out

    def delta(self, name: str) -> np.ndarray:
        up, down = self.factors(name)
        return up @ down

    def bits_report(self) -> dict[str, object]:
        return bits_report(self.layout, self.file_bytes, self.header_bytes)


def bits_report(layout: Layout, file_bytes: int, header_bytes: int) -> dict[str, object]:
    """Honest accounting: effective bits count every byte of the file over the fp adapter's parameter count."""
    n = max(layout.n_params, 1)
    hist = {str(w): int(np.sum(layout.widths == w)) for w in ADAPTER_WIDTHS}
    return {
        "n_params": layout.n_params,
        "file_bytes": int(file_bytes),
        "effective_bits": 8.0 * file_bytes / n,
        "code_bits": layout.code_bits() / n,
        "bytes": {
            "codes": layout.n_code_bytes,
            "codebooks": layout.n_levels * CODEBOOK_DTYPE.itemsize,
            "widths": (layout.n_channels + 3) // 4,
            "header_and_metadata": int(header_bytes),
        },
        "width_histogram": hist,
    }


def _encode_metadata(modules: Iterable[ModuleEntry], metadata: Mapping[str, object]) -> dict[str, str]:
    """Caller metadata encoded, plus the derived format, version and module table (no checksum yet)."""
    meta = encode_metadata(metadata, JSON_METADATA)
    meta["format"] = FORMAT_NAME
    meta["format_version"] = str(FORMAT_VERSION)
    # Key order is part of the bytes (the header keeps insertion order): caller keys, format, version, modules.
    table = [[m.name, m.out_features, m.in_features, m.rank] for m in modules]
    meta["modules"] = encode_metadata({"modules": table}, ["modules"])["modules"]
    return meta


def header_bytes_bound(modules: list[ModuleEntry], metadata: Mapping[str, object]) -> int:
    """Header bytes of a blob with these modules and metadata whatever its widths: an upper bound (every
    tensor sized as if all channels were 4 bits; header numbers only grow with tensor sizes)."""
    n_channels = sum(2 * m.rank for m in modules)
    max_code_bytes = sum(m.rank * (packed_bytes(m.in_features, 4) + packed_bytes(m.out_features, 4)) for m in modules)
    max_levels = n_channels * 16
    width_bytes = (n_channels + 3) // 4
    meta = _encode_metadata(modules, metadata)
    meta["payload_sha256"] = "0" * 64
    entries = {
        "codes": ("U8", (max_code_bytes,), max_code_bytes),
        "codebooks": ("F16", (max_levels,), 2 * max_levels),
        "widths": ("U8", (width_bytes,), width_bytes),
    }
    return header_size(entries, meta)


def build_blob_bytes(
    modules: list[ModuleEntry],
    widths: np.ndarray,
    codes: list[np.ndarray],
    levels: list[np.ndarray],
    metadata: Mapping[str, object],
) -> bytes:
    """Serialize a blob. ``metadata`` needs every REQUIRED_METADATA key except format, version, modules, checksum."""
    layout = Layout.build(modules, widths)
    tensors = encode_channels(layout, codes, levels)
    if not np.all(np.isfinite(tensors["codebooks"].astype(np.float32))):
        raise BlobContentError("codebook levels overflow float16 or are NaN/Inf; the adapter has non-finite values")
    meta = _encode_metadata(modules, metadata)
    missing = [k for k in REQUIRED_METADATA if k not in meta and k != "payload_sha256"]
    if missing:
        raise ValueError(f"blob metadata lacks {missing}; every v1 blob needs {list(REQUIRED_METADATA)}")
    meta["payload_sha256"] = payload_digest(tensors, meta)
    return serialize(tensors, meta)


# A reader's bounds, checked before anything the file announces is allocated. A SmolLM2 blob's header is ~20 KB
# and its data ~0.6 MB; a rank-64 adapter of a 7B model stays far below these.
LIMITS = Limits(max_header_bytes=1 << 20, max_tensors=len(TENSOR_NAMES), max_data_bytes=256 << 20)
MAX_FEATURES = 1 << 20  # in/out features of one adapted weight
MAX_RANK = 4096
MAX_DECODED_PARAMS = 1 << 28  # factors decoded to float32: at most 1 GiB, whatever the widths
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _module_table(value: object, what: str) -> list[ModuleEntry]:
    """The ``modules`` metadata, strictly: [[name, out, in, rank], ...], each name once, sizes within bounds."""
    modules: list[ModuleEntry] = []
    for name, out_f, in_f, rank in module_entries(value, what, "name, out, in, rank"):
        if not MODULE_NAME.match(name):
            raise BlobContentError(f"{what}: module name {short(name)} is not a dotted module path")
        if not (1 <= out_f <= MAX_FEATURES and 1 <= in_f <= MAX_FEATURES):
            raise BlobContentError(f"{what}: module {name!r} shape [{out_f}, {in_f}] outside 1..{MAX_FEATURES}")
        if not 1 <= rank <= min(out_f, in_f, MAX_RANK):
            raise BlobContentError(f"{what}: module {name!r} rank {rank} outside 1..min(out, in, {MAX_RANK})")
        modules.append(ModuleEntry(name, out_f, in_f, rank))
    n_params = sum(m.n_params for m in modules)
    if n_params > MAX_DECODED_PARAMS:
        raise BlobContentError(f"{what}: the modules announce {n_params} parameters, more than the {MAX_DECODED_PARAMS} limit")
    return modules


def _check_levels(layout: Layout, codebooks: np.ndarray, what: str) -> None:
    """Every channel's levels finite and ascending (the codec's contract; an encoder writes them sorted)."""
    if not np.all(np.isfinite(codebooks)):
        raise BlobContentError(f"{what}: codebooks contain NaN or Inf; refusing to merge a non-finite adapter")
    if codebooks.size > 1:
        within = np.ones(codebooks.size - 1, dtype=bool)
        starts = layout.level_offsets[1:-1]
        within[starts[(starts > 0) & (starts < codebooks.size)] - 1] = False  # pairs that cross a channel boundary
        if np.any(np.diff(codebooks)[within] < 0):
            raise BlobContentError(f"{what}: a codebook's levels are not in ascending order")


def parse_blob(data: bytes | memoryview, what: str = "blob", verify_checksum: bool = True) -> Blob:
    """Parse and verify blob bytes: strict container, format name/version, checksum, structure, semantics."""
    header = parse_header(data, len(data), what, LIMITS)
    meta = header.metadata
    check_envelope(
        meta, what=what, format_name=FORMAT_NAME, reads=SUPPORTED_VERSIONS, required=REQUIRED_METADATA,
        not_this="this is not a lowra adapter blob", remedy="re-export the adapter",
    )
    names = sorted(header.tensors)
    if names != sorted(TENSOR_NAMES):
        raise BlobContentError(f"{what}: tensors {short(names)}, expected exactly {sorted(TENSOR_NAMES)}")
    tensors = {name: tensor_from_buffer(data, header.tensors[name]) for name in names}
    expected_dtypes = {"codes": np.dtype("u1"), "widths": np.dtype("u1"), "codebooks": CODEBOOK_DTYPE}
    for name, dtype in expected_dtypes.items():
        if tensors[name].dtype != dtype or tensors[name].ndim != 1:
            raise BlobContentError(
                f"{what}: tensor {name!r} is {tensors[name].dtype} {list(tensors[name].shape)}, expected 1-D {dtype}"
            )
    if verify_checksum:
        verify_payload(tensors, meta, what, "Re-download or re-export it")
    decoded = decode_json_metadata(meta, JSON_METADATA, what)
    modules = _module_table(decoded["modules"], what)
    n_channels = int(sum(2 * m.rank for m in modules))
    if tensors["widths"].size != (n_channels + 3) // 4:
        raise BlobContentError(
            f"{what}: bit map has {tensors['widths'].size} bytes, expected {(n_channels + 3) // 4} for {n_channels} channels"
        )
    layout = Layout.build(modules, decode_widths(tensors["widths"], n_channels))
    for name, expected in (("codes", layout.n_code_bytes), ("codebooks", layout.n_levels)):
        if tensors[name].size != expected:
            raise BlobContentError(
                f"{what}: tensor {name!r} has {tensors[name].size} entries, the bit map implies {expected}"
            )
    codebooks = tensors["codebooks"].astype(np.float32)
    _check_levels(layout, codebooks, what)
    return Blob(
        metadata=decoded,
        layout=layout,
        codes=np.asarray(tensors["codes"]),
        codebooks=codebooks,
        file_bytes=len(data),
        header_bytes=header.header_bytes,
    )


MAX_FILE_BYTES = 8 + LIMITS.max_header_bytes + LIMITS.max_data_bytes + (1 << 20)  # + a signed envelope's prefix


def read_blob_bytes(source: str | Path | bytes | bytearray) -> tuple[bytes, str]:
    """A blob file's bytes (refusing one larger than any blob can be before reading it) and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > MAX_FILE_BYTES:
            raise BlobError(f"blob of {len(source)} bytes is larger than any adapter blob can be")
        return bytes(source), "blob"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"blob {path} does not exist (expected a .safetensors file written by lowra)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise BlobError(f"blob {path} is {size} bytes, more than any adapter blob can be; refusing to read it")
    return path.read_bytes(), str(path)


def read_blob(path: str | Path, verify_checksum: bool = True) -> Blob:
    """Read and verify an unsigned blob file (signed ones go through ``lowra.device_runtime.trust.open_blob``)."""
    data, what = read_blob_bytes(path)
    return parse_blob(data, what, verify_checksum)
