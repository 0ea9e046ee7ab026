"""The quantized-base artifact ("lowra-base" v1): a LowRA sub-2-bit base model in one safetensors file.

Spec in docs/FORMAT.md ("Quantized base"). numpy only: the device reads this file without torch.

Per quantized linear layer ``M`` (a :class:`~.quantized_weight.QuantizedWeight`), four tensors:
  ``M.codes``      uint8   1-D, rows concatenated, each row ``ceil(in * w_r / 8)`` bytes packed LSB-first
  ``M.codebooks``  float16 1-D, ``2**w_r`` ascending levels per row, rows concatenated
  ``M.widths``     uint8   1-D, one 2-bit width code per row packed LSB-first (code 1/2/3 = width 1/2/4; the
                           adapter bit map's packing, :func:`.format.encode_widths`, where code 0 means width 0 and
                           is refused here: every base row is stored)
  ``M.scales``     float16 2-D ``[out, ceil(in / group_size)]`` absmax per group (``[out, 0]`` without groups)
Every other tensor of the model (embeddings, norms, biases, the output head) is stored under its own
state-dict name; floating tensors as float16 to keep the file small (the quantizer writes them so; the
reader accepts any dtype and widens floats to float32). Tied tensors are stored once and named in ``aliases``.

``__metadata__`` keys: see :data:`REQUIRED_METADATA`.

Version 2 adds an accuracy-recovery adapter (``lowra recover``), part of the base: per module ``M`` it names,
``recovery.M.lora_A`` float16 ``[rank, in]`` and ``recovery.M.lora_B`` float16 ``[out, rank]``, and the metadata key
``recovery`` (JSON ``{"rank", "scaling", "modules": [...], "plain_fingerprint", "training": {...}}``). The layer's
weight is ``decode(M) + scaling * B @ A`` everywhere (the SDK's training base, the device runtime's decoded base),
and the fingerprint covers the recovery tensors, so adapters trained on a recovered base bind to it and never load
on the plain one. A plain base stays version 1, byte for byte.

Version 3 stores the same kind of adapter compressed: one tensor ``recovery.blob`` (uint8, 1-D) holding an adapter
blob (docs/FORMAT.md "Adapter blob", the codec of users' adapters, read with every check of
:func:`.adapter.parse_blob`) whose modules are the recovery modules, each of the layer's shape and of the metadata's
rank. Its decoded factors (float16 levels, the scaling folded into ``up``) are the adapter: ``A = down``,
``B = up``, and the metadata's ``scaling`` is 1.0; the layer's weight is computed exactly as in version 2. The
fingerprint hashes ``recovery.blob`` as stored. At 1 bit per factor the adapter costs ~0.05 bits per quantized weight
instead of ~0.74 as float16 (docs/RESULTS.md).

Version 4 stores every layer's codebook levels as integers (6 bits; 8 in 4-bit rows) times a power of two per row
(:mod:`.int_levels`):
``M.levels`` and ``M.level_exponents`` instead of ``M.codebooks``, half the bits of a 2-bit row's codebook. The reader
expands them to the float16 codebooks exactly, so a layer decodes, and the fingerprint hashes, as the float16 file of
the same levels would. A recovery adapter may come with it in either form (``recovery.blob`` or float16 factors).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lowra.device_runtime._files import atomic_write_bytes, utc_now
from lowra.device_runtime.errors import BlobContentError, ChecksumMismatchError
from lowra.device_runtime.formats.bitpack import decode_widths, encode_widths, packed_bytes
from lowra.device_runtime.formats.constants import (
    BASE_FORMAT as FORMAT_NAME,
    BASE_INT_LEVELS_VERSION as INT_LEVELS_VERSION,
    BASE_READS as SUPPORTED_VERSIONS,
    BASE_COMPRESSED_RECOVERY_VERSION as COMPRESSED_RECOVERY_VERSION,
    BASE_RECOVERY_VERSION as RECOVERY_VERSION,
    BASE_VERSION as FORMAT_VERSION,
    CODEBOOK_FORMATS,
    CODED_WIDTHS,
)
from lowra.device_runtime.formats.container import (
    Header,
    Limits,
    check_envelope,
    check_name,
    decode_json_metadata,
    dtype_name,
    encode_metadata,
    header_size,
    memmap_tensors,
    module_entries,
    parse_header,
    payload_digest,
    serialize,
    short,
    tensor_from_buffer,
    verify_payload,
)
from lowra.device_runtime.formats.int_levels import decode_levels, encode_levels, packed_level_bytes
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight

LAYER_TENSORS = ("codebooks", "codes", "scales", "widths")
INT_LEVEL_TENSORS = ("levels", "level_exponents")  # version 4, instead of "codebooks"
DENSE_DTYPE = np.dtype("<f2")

REQUIRED_METADATA = (
    "format",  # "lowra-base"
    "format_version",  # "1"
    "modules",  # JSON [[module_path, out_features, in_features, group_size], ...] in model order
    "group_size",  # the quantizer's group size (informative; each module carries its own in `modules`)
    "aliases",  # JSON {tensor_name: stored_tensor_name} for tied weights (e.g. lm_head -> embed_tokens)
    "source",  # the model the base was quantized from (path or name)
    "scheme",  # JSON: method, budget in effective bits, widths, weighted, dtypes; informative
    "report",  # JSON: measured error and bits, totals and per module (see sdk.quantize_base); informative
    "fingerprint",  # "sha256:<hex>" of the quantized layers, see quantized_fingerprint()
    "payload_sha256",  # hex sha256 over all tensors and other metadata (format.payload_digest)
    "created",  # ISO-8601 UTC time of writing
)
JSON_METADATA = ("modules", "aliases", "scheme", "report")
RECOVERY_KEY = "recovery"  # versions 2 and 3
RECOVERY_PREFIX = "recovery."
RECOVERY_TENSORS = ("lora_A", "lora_B")  # version 2, per module
RECOVERY_BLOB = "recovery.blob"  # version 3: the whole adapter as one blob
MAX_RECOVERY_RANK = 1024
# Written by write/build from the arguments; callers pass the others.
DERIVED_METADATA = ("format", "format_version", "modules", "fingerprint", "payload_sha256")


def layer_tensors(name: str, weight: QuantizedWeight) -> dict[str, np.ndarray]:
    """The four tensors of one quantized module as a float16 (version 1-3) file stores them (widths packed to 2
    bits per row): what the fingerprint hashes, whatever the storage."""
    return {
        f"{name}.codebooks": np.ascontiguousarray(weight.codebooks, dtype="<f2"),
        f"{name}.codes": np.ascontiguousarray(weight.codes, dtype=np.uint8),
        f"{name}.scales": np.ascontiguousarray(weight.scales, dtype="<f2"),
        f"{name}.widths": encode_widths(weight.widths),
    }


def stored_layer_tensors(name: str, weight: QuantizedWeight, codebook_format: str) -> dict[str, np.ndarray]:
    """The tensors the file stores for one module: :func:`layer_tensors`, with ``codebooks`` replaced by ``levels``
    and ``level_exponents`` when ``codebook_format`` is "int" (ValueError if its levels are not on that grid)."""
    tensors = layer_tensors(name, weight)
    if codebook_format == "int":
        books = tensors.pop(f"{name}.codebooks")
        levels, exponents = encode_levels(books, weight.widths, f"module {name!r}")
        tensors.update({f"{name}.levels": levels, f"{name}.level_exponents": exponents})
    return tensors


def check_codebook_format(codebook_format: object) -> str:
    if codebook_format not in CODEBOOK_FORMATS:
        raise ValueError(f"codebook_format must be one of {CODEBOOK_FORMATS}, got {codebook_format!r}")
    return str(codebook_format)


def file_version(recovery: "Recovery | None", codebook_format: str) -> int:
    """The version a base is written as: 4 with integer codebooks, else 2/3 with a recovery adapter, else 1."""
    if codebook_format == "int":
        return INT_LEVELS_VERSION
    return FORMAT_VERSION if recovery is None else recovery.version


def recovered_weight(decoded: np.ndarray, a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """``decode + scaling * B @ A`` as float32, computed the one way every consumer must: the device runtime, the
    SDK's frozen weight and a native runtime on another CPU all hash these bytes into the fingerprint an adapter
    binds to, so no BLAS (whose summation order varies) may compute it.

    In float64, no fused multiply-add: ``acc = sum over k = 0, 1, ... rank-1 of B[:, k] * A[k, :]`` (k ascending,
    each product of two float16 values exact), then ``float32(decode + scaling * acc)`` (one rounding)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    acc = np.zeros((b64.shape[0], a64.shape[1]), dtype=np.float64)
    for k in range(a64.shape[0]):
        acc += b64[:, k : k + 1] * a64[k : k + 1, :]
    return (np.asarray(decoded, dtype=np.float64) + float(scaling) * acc).astype(np.float32)


@dataclass
class Recovery:
    """An accuracy-recovery adapter stored with a base: ``W_M = decode(M) + scaling * B_M @ A_M`` for each module.

    ``factors[M] = (A [rank, in], B [out, rank])`` as float16 (the stored values are the adapter); ``info`` holds
    the informative part of the ``recovery`` metadata (the plain base's fingerprint, how it was trained)."""

    rank: int
    scaling: float
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    info: dict[str, object] = field(default_factory=dict)
    blob: bytes | None = None  # version 3: the adapter blob the factors were decoded from (what the file stores)

    @classmethod
    def from_blob(cls, data: bytes | memoryview, info: Mapping[str, object] | None = None,
                  what: str = "recovery adapter") -> Recovery:
        """The adapter a version-3 base stores: ``data`` read as an adapter blob, its factors decoded (float16
        levels; zeros where a component was dropped) and the scaling folded in (1.0)."""
        from lowra.device_runtime.formats.adapter import parse_blob

        raw = bytes(data)  # one copy: parsed here and kept as what the file stores
        blob = parse_blob(raw, what)
        ranks = sorted({m.rank for m in blob.modules})
        if len(ranks) != 1:
            raise BlobContentError(f"{what}: its modules have ranks {ranks[:4]}; a recovery adapter has one rank")
        factors = {name: (down.astype(np.float16), up.astype(np.float16))
                   for name, (up, down) in blob.all_factors().items()}
        return cls(rank=ranks[0], scaling=1.0, factors=factors, info=dict(info or {}), blob=raw)

    def apply(self, module: str, decoded: np.ndarray) -> np.ndarray:
        """The module's weight with the adapter: :func:`recovered_weight` of its decoded float32 weight."""
        a, b = self.factors[module]
        return recovered_weight(decoded, a, b, self.scaling)

    def tensors(self) -> dict[str, np.ndarray]:
        """What the file stores for the adapter: the blob (version 3) or each module's float16 factors."""
        if self.blob is not None:
            return {RECOVERY_BLOB: np.frombuffer(self.blob, dtype=np.uint8)}
        out: dict[str, np.ndarray] = {}
        for name, (a, b) in self.factors.items():
            out[f"{RECOVERY_PREFIX}{name}.lora_A"] = np.ascontiguousarray(a, dtype="<f2")
            out[f"{RECOVERY_PREFIX}{name}.lora_B"] = np.ascontiguousarray(b, dtype="<f2")
        return out

    def metadata(self) -> dict[str, object]:
        return {**self.info, "rank": int(self.rank), "scaling": float(self.scaling), "modules": sorted(self.factors)}

    @property
    def version(self) -> int:
        """The base format version a file with this adapter is written as."""
        return RECOVERY_VERSION if self.blob is None else COMPRESSED_RECOVERY_VERSION

    @property
    def n_params(self) -> int:
        return int(sum(a.size + b.size for a, b in self.factors.values()))


def quantized_fingerprint(layers: Mapping[str, QuantizedWeight], recovery: Recovery | None = None) -> str:
    """Identity of the quantized weights, independent of metadata (report, time) and of the dense tensors.

    sha256 over the modules sorted by name; per module the UTF-8 line ``"{name}|[out, in]|{group_size}\\n"``,
    then for each of its tensors in the order codebooks, codes, scales, widths (as stored: widths 2-bit packed)
    ``"{tensor_name}|{numpy dtype str}|{shape list}|"`` followed by the raw little-endian bytes.
    An adapter trained against this base names this fingerprint; a bit flip in any code or level changes it.
    With a recovery adapter (version 2) the line ``"recovery|{rank}|{scaling!r}\n"`` follows, then each recovery
    tensor sorted by name, hashed the same way: the same layers with and without recovery are different bases.
    """
    h = hashlib.sha256()
    for name in sorted(layers):
        w = layers[name]
        h.update(f"{name}|{[w.out_features, w.in_features]}|{w.group_size}\n".encode())
        for tname, arr in sorted(layer_tensors(name, w).items()):
            h.update(f"{tname}|{arr.dtype.str}|{list(arr.shape)}|".encode())
            h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    if recovery is not None:
        h.update(f"recovery|{int(recovery.rank)}|{float(recovery.scaling)!r}\n".encode())
        for tname, arr in sorted(recovery.tensors().items()):
            h.update(f"{tname}|{arr.dtype.str}|{list(arr.shape)}|".encode())
            h.update(arr.reshape(-1).view(np.uint8))
    return "sha256:" + h.hexdigest()


@dataclass
class QuantizedBase:
    """A quantized base in memory: low-bit layers, dense tensors, decoded metadata and the fingerprint."""

    layers: dict[str, QuantizedWeight]
    dense: dict[str, np.ndarray]
    metadata: dict[str, object]
    fingerprint: str
    file_bytes: int = 0  # size of the file this was read from or will serialize to (0 = unknown)
    header_bytes: int = 0
    aliases: dict[str, str] = field(default_factory=dict)
    claims: dict[str, object] | None = None  # the verified signed claims, when the file came signed
    recovery: Recovery | None = None  # the accuracy-recovery adapter of a version-2 base
    codebook_format: str = "float16"  # how the file stores the levels: "float16" or "int" (version 4)

    @property
    def report(self) -> dict[str, object]:
        return dict(self.metadata.get("report") or {})

    @property
    def n_quantized_params(self) -> int:
        return int(sum(w.out_features * w.in_features for w in self.layers.values()))

    def dense_data_bytes(self) -> int:
        return int(sum(np.asarray(a).nbytes for a in self.dense.values()))

    def bits_report(self) -> dict[str, object]:
        """Effective bits over the quantized layers: every byte of the file except the dense tensors' data.

        The header (all metadata and every tensor's entry, dense ones included) counts against the layers;
        the dense tensors (embeddings, norms, head) are reported separately, in bytes and as whole-file bits
        per model parameter, so the low-bit part is comparable across models and papers.
        """
        n = max(self.n_quantized_params, 1)
        layer_bytes = {k: 0 for k in LAYER_TENSORS}
        hist = {"1": 0, "2": 0, "4": 0}
        code_bits = 0
        for name, w in self.layers.items():
            for tname, arr in stored_layer_tensors(name, w, self.codebook_format).items():
                kind = tname.rsplit(".", 1)[1]
                layer_bytes["codebooks" if kind in INT_LEVEL_TENSORS else kind] += arr.nbytes
            for width in CODED_WIDTHS:
                hist[str(width)] += int(np.sum(w.widths == width))
            code_bits += w.code_bits()
        dense_bytes = self.dense_data_bytes()
        n_dense = int(sum(np.asarray(a).size for a in self.dense.values()))
        recovery_bytes = int(sum(a.nbytes for a in self.recovery.tensors().values())) if self.recovery else 0
        quantized_bytes = self.file_bytes - dense_bytes - recovery_bytes
        extra = {}
        if self.recovery is not None:
            extra = {"recovery_bytes": recovery_bytes, "recovery_bits": 8.0 * recovery_bytes / n,
                     "effective_bits_with_recovery": 8.0 * (quantized_bytes + recovery_bytes) / n}
        return {
            "n_quantized_params": self.n_quantized_params,
            "n_dense_params": n_dense,
            "file_bytes": int(self.file_bytes),
            "effective_bits": 8.0 * quantized_bytes / n,
            "code_bits": code_bits / n,
            "bytes": {**layer_bytes, "header_and_metadata": int(self.header_bytes), "dense": dense_bytes},
            "file_bits_per_model_param": 8.0 * self.file_bytes / max(n + n_dense, 1),
            "width_histogram": hist,
            **extra,
        }

    def dequantized_state_dict(self) -> dict[str, np.ndarray]:
        """Every weight of the model as float32 numpy (what a runtime merges adapters into).

        Quantized modules appear as ``"{module}.weight"`` (plus the recovery adapter's ``scaling * B @ A`` on a
        version-2 base); tied tensors under every name (same array).
        Non-floating dense tensors keep their dtype.
        """
        out: dict[str, np.ndarray] = {}
        for name, w in self.layers.items():
            out[f"{name}.weight"] = w.dequantize()
            if self.recovery is not None and name in self.recovery.factors:
                out[f"{name}.weight"] = self.recovery.apply(name, out[f"{name}.weight"])
        for name, arr in self.dense.items():
            arr = np.asarray(arr)
            out[name] = arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else np.array(arr)
        for alias, target in self.aliases.items():
            out[alias] = out[target]
        return out

    def to_bytes(self) -> bytes:
        return build_quantized_base_bytes(self.layers, self.dense, self._caller_metadata(), recovery=self.recovery,
                                          codebook_format=self.codebook_format)

    def write(self, path: str | Path, overwrite: bool = False) -> Path:
        return atomic_write_bytes(path, self.to_bytes(), overwrite=overwrite)

    def _caller_metadata(self) -> dict[str, object]:
        return {k: v for k, v in self.metadata.items() if k not in DERIVED_METADATA and k != RECOVERY_KEY}


def _caller_fields(metadata: Mapping[str, object]) -> dict[str, str]:
    """The encoded metadata a caller supplies (derived keys dropped; ``created`` and ``aliases`` defaulted)."""
    meta = encode_metadata({k: v for k, v in metadata.items() if k not in DERIVED_METADATA}, JSON_METADATA)
    meta.setdefault("created", utc_now())
    meta.setdefault("aliases", "{}")
    return meta


def _modules_json(modules: Sequence[tuple[str, int, int, int]]) -> str:
    return encode_metadata({"modules": [list(m) for m in modules]}, ["modules"])["modules"]


def _encode_metadata(
    layers: Mapping[str, QuantizedWeight], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, object],
    recovery: Recovery | None = None, codebook_format: str = "float16",
) -> dict[str, str]:
    meta = _caller_fields({k: v for k, v in metadata.items() if k != RECOVERY_KEY})
    meta["format"] = FORMAT_NAME
    meta["format_version"] = str(file_version(recovery, codebook_format))
    meta["modules"] = _modules_json([(n, w.out_features, w.in_features, w.group_size) for n, w in layers.items()])
    meta["fingerprint"] = quantized_fingerprint(layers, recovery)
    if recovery is not None:
        meta[RECOVERY_KEY] = encode_metadata({RECOVERY_KEY: recovery.metadata()}, [RECOVERY_KEY])[RECOVERY_KEY]
    missing = [k for k in REQUIRED_METADATA if k not in meta and k != "payload_sha256"]
    if missing:
        raise ValueError(f"quantized-base metadata lacks {missing}; every v1 file needs {list(REQUIRED_METADATA)}")
    meta["payload_sha256"] = payload_digest(tensors, meta)
    return meta


def _all_tensors(layers: Mapping[str, QuantizedWeight], dense: Mapping[str, np.ndarray], aliases: Mapping[str, str],
                 recovery: Recovery | None = None, codebook_format: str = "float16"):
    tensors: dict[str, np.ndarray] = {}
    check_codebook_format(codebook_format)
    for name, w in layers.items():
        w.validate(f"module {name!r}")
        tensors.update(stored_layer_tensors(name, w, codebook_format))
    if recovery is not None:
        _check_recovery(recovery, layers, "recovery adapter")
        tensors.update(recovery.tensors())
    for name, arr in dense.items():
        if name in tensors:
            raise BlobContentError(
                f"dense tensor {name!r} collides with a quantized module's tensor of the same name; rename it"
            )
        arr = np.ascontiguousarray(arr)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise BlobContentError(f"dense tensor {name!r} contains NaN or Inf (after the cast to {arr.dtype})")
        tensors[name] = arr
    for alias, target in aliases.items():
        if target not in dense or alias in tensors:
            raise BlobContentError(
                f"alias {alias!r} -> {target!r}: the target must be a stored dense tensor and the alias a name "
                "not stored itself"
            )
    return tensors


def build_quantized_base_bytes(
    layers: Mapping[str, QuantizedWeight], dense: Mapping[str, np.ndarray], metadata: Mapping[str, object],
    recovery: Recovery | None = None, codebook_format: str = "float16",
) -> bytes:
    """Serialize a quantized base. ``metadata`` needs source, group_size, scheme, report (created and aliases
    default to now and {}); format, version, modules, fingerprint and checksum are derived here. The version is
    :func:`file_version`'s: 1, 2 or 3 (with ``recovery``) with float16 codebooks, 4 with ``codebook_format="int"``
    (every layer's levels must then be on the integer grid, as ``QuantizeConfig(codebook_format="int")`` fits them)."""
    tensors = _all_tensors(layers, dense, dict(metadata.get("aliases") or {}), recovery, codebook_format)
    return serialize(tensors, _encode_metadata(layers, tensors, metadata, recovery, codebook_format))


def serialized_size(
    layers: Mapping[str, QuantizedWeight], dense: Mapping[str, np.ndarray], metadata: Mapping[str, object],
    codebook_format: str = "float16",
) -> tuple[int, int]:
    """(file bytes, header bytes) that :func:`build_quantized_base_bytes` produces, without building the buffer."""
    tensors = _all_tensors(layers, dense, dict(metadata.get("aliases") or {}), codebook_format=codebook_format)
    meta = _encode_metadata(layers, tensors, metadata, codebook_format=codebook_format)
    entries = {k: (dtype_name(v.dtype), tuple(v.shape), v.nbytes) for k, v in tensors.items()}
    head = header_size(entries, meta)
    return head + sum(v.nbytes for v in tensors.values()), head


def header_bytes_bound(
    modules: Sequence[tuple[str, int, int, int]], dense: Mapping[str, np.ndarray], metadata: Mapping[str, object],
    codebook_format: str = "float16",
) -> int:
    """Header bytes of a file with these modules [(name, out, in, group_size)], dense tensors and metadata,
    whatever the row widths: an upper bound, exact when every row is 4 bits.

    Header length only grows with tensor sizes (shapes and data offsets are the only numbers in it that depend
    on the widths), so sizing every layer at 4 bits bounds it; fingerprint and checksum have fixed lengths.
    A quantizer spends ``budget - this`` on the layers and can never end up over budget because of the header.
    """
    entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for name, out_f, in_f, group in modules:
        n_groups = -(-in_f // group) if group else 0
        code_bytes = out_f * packed_bytes(in_f, 4)
        if codebook_format == "int":
            level_bytes = packed_level_bytes(np.full(out_f, 4))
            entries[f"{name}.levels"] = ("U8", (level_bytes,), level_bytes)
            entries[f"{name}.level_exponents"] = ("I8", (out_f,), out_f)
        else:
            entries[f"{name}.codebooks"] = ("F16", (out_f * 16,), 2 * out_f * 16)
        entries[f"{name}.codes"] = ("U8", (code_bytes,), code_bytes)
        entries[f"{name}.scales"] = ("F16", (out_f, n_groups), 2 * out_f * n_groups)
        entries[f"{name}.widths"] = ("U8", ((out_f + 3) // 4,), (out_f + 3) // 4)
    for name, arr in dense.items():
        entries[name] = (dtype_name(arr.dtype), tuple(arr.shape), int(arr.nbytes))
    meta = _caller_fields(metadata)
    meta.update(
        format=FORMAT_NAME,
        format_version=str(file_version(None, codebook_format)),
        modules=_modules_json(modules),
        fingerprint="sha256:" + "0" * 64,
        payload_sha256="0" * 64,
    )
    return header_size(entries, meta)


def write_quantized_base(
    path: str | Path,
    layers: Mapping[str, QuantizedWeight],
    dense: Mapping[str, np.ndarray],
    metadata: Mapping[str, object],
    overwrite: bool = False,
    codebook_format: str = "float16",
) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written base under ``path``."""
    data = build_quantized_base_bytes(layers, dense, metadata, codebook_format=codebook_format)
    return atomic_write_bytes(path, data, overwrite=overwrite)


# A reader's bounds: SmolLM2's base has ~950 tensors and a ~150 KB header.
LIMITS = Limits(max_header_bytes=16 << 20, max_tensors=200_000, max_data_bytes=1 << 40)
MAX_FEATURES = 1 << 20


def _module_table(value: object, what: str) -> list[tuple[str, int, int, int]]:
    """The ``modules`` metadata, strictly: [[name, out, in, group_size], ...], each name once, sizes in bounds."""
    table = module_entries(value, what, "name, out, in, group_size")
    for name, out_f, in_f, group in table:
        if not (1 <= out_f <= MAX_FEATURES and 1 <= in_f <= MAX_FEATURES and 0 <= group <= MAX_FEATURES):
            raise BlobContentError(
                f"{what}: module {name!r} shape [{out_f}, {in_f}] / group {group} outside 1..{MAX_FEATURES}"
            )
    return table


def _check_recovery(recovery: Recovery, layers: Mapping[str, QuantizedWeight], what: str) -> None:
    """Rank in bounds, a finite positive scaling, factors of the module's shape, finite float16 values."""
    rank, scaling = recovery.rank, recovery.scaling
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RECOVERY_RANK:
        raise BlobContentError(f"{what}: rank {short(rank)} is not an integer in 1..{MAX_RECOVERY_RANK}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not (np.isfinite(scaling) and scaling > 0):
        raise BlobContentError(f"{what}: scaling {short(scaling)} is not a finite number > 0")
    if not recovery.factors:
        raise BlobContentError(f"{what}: names no module; a recovery adapter covers at least one quantized layer")
    for name, (a, b) in recovery.factors.items():
        if name not in layers:
            raise BlobContentError(f"{what}: module {name!r} is not a quantized layer of this base")
        w = layers[name]
        want = {"lora_A": (rank, w.in_features), "lora_B": (w.out_features, rank)}
        for tname, arr in (("lora_A", a), ("lora_B", b)):
            arr = np.asarray(arr)
            if tuple(arr.shape) != want[tname] or not np.issubdtype(arr.dtype, np.floating):
                raise BlobContentError(
                    f"{what}: {RECOVERY_PREFIX}{name}.{tname} is {arr.dtype} {list(arr.shape)}, expected float16 "
                    f"{list(want[tname])}"
                )
            if not np.all(np.isfinite(arr.astype(np.float16))):
                raise BlobContentError(f"{what}: {RECOVERY_PREFIX}{name}.{tname} contains NaN or Inf (as float16)")


def _read_recovery(value: object, tensors: Mapping[str, np.ndarray], layers: Mapping[str, QuantizedWeight],
                   what: str, compressed: bool) -> Recovery:
    """The recovery adapter: its metadata object and exactly the tensors it names (version 2), or the blob that
    holds it (``compressed``: version 3, or version 4 with ``recovery.blob``)."""
    if not isinstance(value, dict) or not {"rank", "scaling", "modules"} <= set(value):
        raise BlobContentError(f"{what}: the recovery metadata must be an object with rank, scaling and modules")
    modules = value["modules"]
    if not isinstance(modules, list) or len(set(map(str, modules))) != len(modules) or not all(
            isinstance(m, str) for m in modules):
        raise BlobContentError(f"{what}: recovery modules must be a list of distinct module names")
    info = {k: v for k, v in value.items() if k not in ("rank", "scaling", "modules")}
    if compressed:
        return _read_recovery_blob(value, tensors, layers, info, what)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in modules:
        pair = []
        for tname in RECOVERY_TENSORS:
            key = f"{RECOVERY_PREFIX}{name}.{tname}"
            if key not in tensors:
                raise BlobContentError(f"{what}: the recovery adapter names module {name!r} but lacks {key}")
            arr = tensors[key]
            if arr.dtype != DENSE_DTYPE:
                raise BlobContentError(f"{what}: {key} is {arr.dtype}, expected float16")
            pair.append(arr)
        factors[name] = (pair[0], pair[1])
    recovery = Recovery(rank=value["rank"], scaling=value["scaling"], factors=factors, info=info)
    _check_recovery(recovery, layers, f"{what}: recovery adapter")
    return recovery


def _read_recovery_blob(value: dict, tensors: Mapping[str, np.ndarray], layers: Mapping[str, QuantizedWeight],
                        info: dict[str, object], what: str) -> Recovery:
    """Version 3: ``recovery.blob`` read as an adapter blob; its modules, rank and scaling are the metadata's."""
    raw = tensors.get(RECOVERY_BLOB)
    if raw is None:
        raise BlobContentError(f"{what}: a compressed recovery adapter (version {COMPRESSED_RECOVERY_VERSION}) needs "
                               f"{RECOVERY_BLOB}")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise BlobContentError(f"{what}: {RECOVERY_BLOB} is {raw.dtype} {list(raw.shape)}, expected uint8 [bytes]")
    where = f"{what}: recovery adapter"
    recovery = Recovery.from_blob(memoryview(np.ascontiguousarray(raw)).cast("B"), info, where)
    if sorted(recovery.factors) != sorted(value["modules"]):
        raise BlobContentError(f"{where}: the blob's modules are not the {len(value['modules'])} the metadata names")
    if value["rank"] != recovery.rank or type(value["rank"]) is not int:
        raise BlobContentError(f"{where}: rank {short(value['rank'])} in the metadata, {recovery.rank} in the blob")
    if value["scaling"] != 1.0 or isinstance(value["scaling"], bool):
        raise BlobContentError(f"{where}: scaling {short(value['scaling'])}; a compressed adapter folds it in (1.0)")
    _check_recovery(recovery, layers, where)
    return recovery


def _check_dense(dense: Mapping[str, np.ndarray], layers: Mapping[str, QuantizedWeight], what: str) -> None:
    """Dense tensors are finite and never stand in for a quantized layer's weight."""
    for name, arr in dense.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in layers:
            raise BlobContentError(f"{what}: dense tensor {name!r} would shadow the quantized layer {module!r}")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise BlobContentError(f"{what}: dense tensor {name!r} contains NaN or Inf")


def _alias_table(value: object, dense: Mapping[str, np.ndarray], layers: Mapping[str, QuantizedWeight],
                 what: str) -> dict[str, str]:
    """Tied tensors: each alias names a tensor not stored itself, of the same kind (same last name component) as
    the stored dense tensor it points to, and no quantized layer's weight."""
    if not isinstance(value, dict):
        raise BlobContentError(f"{what}: aliases must be an object mapping names to stored dense tensors")
    for alias, target in value.items():
        check_name(alias, what, "alias", 512)
        if not isinstance(target, str) or target not in dense:
            raise BlobContentError(f"{what}: alias {short(alias)} -> {short(target)}: the target is not a stored dense tensor")
        if alias in dense or (alias.endswith(".weight") and alias.rsplit(".", 1)[0] in layers):
            raise BlobContentError(f"{what}: alias {alias!r} names a tensor the file stores itself")
        if alias.rsplit(".", 1)[-1] != target.rsplit(".", 1)[-1]:
            raise BlobContentError(f"{what}: alias {alias!r} -> {target!r} ties tensors of different kinds")
    return dict(value)


def read_quantized_base(path: str | Path, verify_checksum: bool = True) -> QuantizedBase:
    """Map a quantized base read-only and verify it: container, format/version, checksum, fingerprint, layers.

    Tensors stay memory-mapped (nothing is copied until decoded), so a device can keep the file as the
    pristine base and decode layers on demand.
    """
    path = Path(path)
    what = f"quantized base {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{what} does not exist (expected a .safetensors file written by `lowra quantize-base`)")
    header, tensors = memmap_tensors(path, LIMITS)
    return _from_tensors(header, tensors, path.stat().st_size, what, verify_checksum)


def parse_quantized_base(data: bytes | memoryview, what: str = "quantized base", verify_checksum: bool = True) -> QuantizedBase:
    """The same checks as :func:`read_quantized_base` on a file's bytes already in memory (e.g. the body of a
    signed base after its signature was checked)."""
    header = parse_header(data, len(data), what, LIMITS)
    tensors = {name: tensor_from_buffer(data, info) for name, info in header.tensors.items()}
    return _from_tensors(header, tensors, len(data), what, verify_checksum)


def _from_tensors(header: Header, tensors: dict[str, np.ndarray], file_bytes: int, what: str,
                  verify_checksum: bool) -> QuantizedBase:
    meta = header.metadata
    check_envelope(
        meta, what=what, format_name=FORMAT_NAME, reads=SUPPORTED_VERSIONS, required=REQUIRED_METADATA,
        not_this="this is not a lowra quantized base (an adapter blob says 'lowra-adapter'; a plain model folder "
        "is loaded with DeviceRuntime)",
        remedy="re-quantize the base",
    )
    if verify_checksum:
        verify_payload(tensors, meta, what, "Copy it again or re-quantize the base")
    decoded = decode_json_metadata(meta, JSON_METADATA, what)
    modules = _module_table(decoded["modules"], what)
    version = int(meta["format_version"])
    integer = version == INT_LEVELS_VERSION
    stored = [t for t in LAYER_TENSORS if t != "codebooks"] + list(INT_LEVEL_TENSORS) if integer else list(LAYER_TENSORS)
    other = ["codebooks"] if integer else list(INT_LEVEL_TENSORS)
    layers: dict[str, QuantizedWeight] = {}
    for name, out_f, in_f, group in modules:
        names = {t: f"{name}.{t}" for t in stored}
        absent = [n for n in names.values() if n not in tensors]
        if absent:
            raise BlobContentError(f"{what}: module {name!r} lacks tensors {absent}")
        foreign = [f"{name}.{t}" for t in other if f"{name}.{t}" in tensors]
        if foreign:
            raise BlobContentError(
                f"{what}: a version-{version} base stores codebooks as {'integer levels' if integer else 'float16'}, but "
                f"module {name!r} also has {foreign}"
            )
        packed = tensors[names["widths"]]
        if packed.dtype != np.uint8 or packed.shape != ((out_f + 3) // 4,):
            raise BlobContentError(
                f"{what}: {names['widths']} is {packed.dtype} {list(packed.shape)}, expected uint8 [{(out_f + 3) // 4}] "
                f"(2-bit width codes for {out_f} rows)"
            )
        widths = decode_widths(packed, out_f)
        if np.any(widths == 0):
            raise BlobContentError(f"{what}: module {name!r} has rows of width 0; every base row needs 1, 2 or 4 bits")
        if integer:
            books = decode_levels(tensors[names["levels"]], tensors[names["level_exponents"]], widths,
                                  f"{what}: module {name!r}")
        else:
            books = tensors[names["codebooks"]]
        weight = QuantizedWeight(
            out_features=out_f, in_features=in_f, group_size=group, widths=widths,
            codes=tensors[names["codes"]], codebooks=books, scales=tensors[names["scales"]],
        )
        weight.validate(f"{what}: module {name!r}")
        layers[name] = weight
    layer_names = {f"{n}.{t}" for n, *_ in modules for t in stored}
    recovery = None
    carries = RECOVERY_KEY in meta or any(k.startswith(RECOVERY_PREFIX) for k in tensors)
    if version in (RECOVERY_VERSION, COMPRESSED_RECOVERY_VERSION) or (integer and carries):
        if RECOVERY_KEY not in meta:
            raise BlobContentError(f"{what}: a version-{version} base needs the {RECOVERY_KEY!r} metadata")
        compressed = version == COMPRESSED_RECOVERY_VERSION or (integer and RECOVERY_BLOB in tensors)
        recovery = _read_recovery(decode_json_metadata(meta, [RECOVERY_KEY], what)[RECOVERY_KEY], tensors, layers,
                                  what, compressed)
        layer_names |= {k for k in tensors if k.startswith(RECOVERY_PREFIX)}
        named = set(recovery.tensors())
        stray = sorted(k for k in tensors if k.startswith(RECOVERY_PREFIX) and k not in named)
        if stray:
            raise BlobContentError(f"{what}: recovery tensors {stray[:3]} belong to no module the metadata names")
    elif carries:
        raise BlobContentError(
            f"{what}: a version-{version} base carries recovery data; only versions {RECOVERY_VERSION}, "
            f"{COMPRESSED_RECOVERY_VERSION} and {INT_LEVELS_VERSION} may (re-run `lowra recover`)"
        )
    dense = {k: v for k, v in tensors.items() if k not in layer_names}
    fingerprint = quantized_fingerprint(layers, recovery)
    if fingerprint != meta["fingerprint"]:
        raise ChecksumMismatchError(
            f"{what}: the quantized layers hash to {fingerprint[:23]}..., the file says {meta['fingerprint'][:23]}...; "
            "the file is corrupted or was modified. Re-quantize the base"
        )
    _check_dense(dense, layers, what)
    aliases = _alias_table(decoded["aliases"], dense, layers, what)
    return QuantizedBase(
        layers=layers, dense=dense, metadata=decoded, fingerprint=fingerprint,
        file_bytes=file_bytes, header_bytes=header.header_bytes, aliases=aliases, recovery=recovery,
        codebook_format="int" if integer else "float16",
    )
