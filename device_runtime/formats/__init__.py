"""Every lowra on-disk format, and nothing else (spec: docs/FORMAT.md). numpy only.

- :mod:`.constants`: format names, versions and the width tables they share;
- :mod:`.container`: the safetensors container and lowra's metadata envelope (format, version, checksum, JSON);
- :mod:`.bitpack`: LSB-first sub-byte packing and the 2-bit width map;
- :mod:`.fingerprint`: the base fingerprint an adapter binds to, and the one check of that binding;
- :mod:`.adapter`: the per-user adapter blob; :mod:`.quantized_weight` and :mod:`.quantized_base`: the low-bit base;
- :mod:`.onnx_manifest` and :mod:`.executorch_manifest`: the exported model folders, read through
  :mod:`.manifest` (the JSON manifest envelope and the recorded prompt template).

Writers (sdk, export) and readers (runtime, engines) import these modules; nothing else defines a byte on disk.
The adapter blob's API is re-exported here, so ``from lowra.device_runtime import formats as fmt`` gives
``fmt.read_blob``, ``fmt.Blob``, ``fmt.pack_codes``, ``fmt.base_fingerprint`` and so on.
"""
from lowra.device_runtime.formats.adapter import (
    CODEBOOK_DTYPE,
    FORMAT_NAME,
    FORMAT_VERSION,
    JSON_METADATA,
    REQUIRED_METADATA,
    SUPPORTED_VERSIONS,
    TENSOR_NAMES,
    Blob,
    Layout,
    ModuleEntry,
    build_blob_bytes,
    decode_channel_group,
    encode_channels,
    header_bytes_bound,
    read_blob_bytes,
    parse_blob,
    read_blob,
)
from lowra.device_runtime.formats.bitpack import decode_widths, encode_widths, pack_codes, packed_bytes, unpack_codes
from lowra.device_runtime.formats.constants import ADAPTER_WIDTHS, CODED_WIDTHS, WIDTH_CODE
from lowra.device_runtime.formats.container import payload_digest
from lowra.device_runtime.formats.fingerprint import base_fingerprint, check_base_binding, tensor_digest

__all__ = [
    "ADAPTER_WIDTHS",
    "CODEBOOK_DTYPE",
    "CODED_WIDTHS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "JSON_METADATA",
    "REQUIRED_METADATA",
    "SUPPORTED_VERSIONS",
    "TENSOR_NAMES",
    "WIDTH_CODE",
    "Blob",
    "Layout",
    "ModuleEntry",
    "base_fingerprint",
    "build_blob_bytes",
    "check_base_binding",
    "header_bytes_bound",
    "decode_channel_group",
    "decode_widths",
    "encode_channels",
    "encode_widths",
    "read_blob_bytes",
    "pack_codes",
    "packed_bytes",
    "parse_blob",
    "payload_digest",
    "read_blob",
    "tensor_digest",
    "unpack_codes",
]
