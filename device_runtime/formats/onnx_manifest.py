"""The ONNX model directory (lowra-onnx v1; docs/FORMAT.md, "ONNX model directory"): file names, the manifest,
LoRA input names, the ``.onnx_adapter`` (versions, parameters, writer), and the layout of each quantized
module's width groups in ``weights.bin``. Written by ``lowra.export.onnx``, read by ``lowra.device_runtime.engines.onnx``. numpy only,
except :func:`write_adapter_file`: the AdapterFormat flatbuffer has one serializer, onnxruntime's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lowra.device_runtime._files import atomic_file
from lowra.device_runtime.errors import BaseMismatchError, OnnxModelError
from lowra.device_runtime.formats.adapter import Blob
from lowra.device_runtime.formats.bitpack import pack_codes, packed_bytes, unpack_codes
from lowra.device_runtime.formats.fingerprint import base_fingerprint
from lowra.device_runtime.formats.manifest import read_manifest_json
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight

MANIFEST_NAME = "lowra_onnx.json"
MANIFEST_FORMAT = "lowra-onnx"
MANIFEST_VERSION = 1
WEIGHTS_NAME = "weights.bin"
LOWBIT_GRAPH = "model.onnx"
MERGE_GRAPH = "model_merge.onnx"
# Location of the merge graph's float32 weights: never read, because the engine always overrides them.
MERGE_PLACEHOLDER = "supplied-by-the-runtime-at-session-creation.bin"
LORA_DOWN = "lora.{module}.down_t"  # [in, rank]: LoRA A transposed, so the graph multiplies x @ down_t @ up_t
LORA_UP = "lora.{module}.up_t"  # [rank, out]: LoRA B transposed, scaling folded in (as in the blob)
ADAPTER_VERSION = 1
# A recovered base's (quantized base format version 2) accuracy-recovery factors in the low-bit graph, float16,
# transposed: A_t [in, rank], B_t [rank, out]. The manifest's "recovery" locates them in weights.bin.
RECOVERY_TENSOR = "recovery.{module}.{factor}"
# How each tensor of a width group (manifest ``quantized_modules[m]["groups"]``) is read from weights.bin.
GROUP_TENSOR_DTYPES = {"rows": "<i4", "codes": "u1", "codebooks": "<f2", "scales": "<f2"}


def model_version_of(digests: Mapping[str, str], shapes: Mapping[str, Any]) -> int:
    """The integer an ``.onnx_adapter`` carries as its model version: the first 28 bits of the base fingerprint
    over every linear of the model. AdapterFormat stores a 32-bit int, not a string, so this catches an adapter
    for another model (1 in 2**28 chance of a miss); a lowra blob is always checked on its full fingerprint."""
    fingerprint = base_fingerprint(dict(digests), {k: tuple(v) for k, v in shapes.items()})
    return int(fingerprint.split(":", 1)[1][:7], 16)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """Read and check ``lowra_onnx.json``: format, version, the graph files it names present."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise OnnxModelError(f"ONNX model directory {model_dir} does not exist")
    manifest = read_manifest_json(
        model_dir, MANIFEST_NAME, format_name=MANIFEST_FORMAT, version=MANIFEST_VERSION,
        writer="`python -m lowra.export.onnx`", error=OnnxModelError,
    )  # fmt: skip
    for key in ("lowbit", "merge"):
        name = manifest.get("graphs", {}).get(key)
        if name and not (model_dir / name).is_file():
            raise OnnxModelError(f"{model_dir}: the manifest names {name} but the file is missing")
    return manifest


def pack_group_codes(codes: np.ndarray, width: int) -> np.ndarray:
    """Codes ``[rows, in]`` of one width group as weights.bin stores them (uint8): 1-bit rows each LSB-first
    from a byte boundary (``[rows, ceil(in / 8)]``); 2 and 4 bits the flat tensor packed LSB-first, as ONNX
    packs its UINT2/UINT4 tensors."""
    if width == 1:
        return pack_codes(codes, 1)
    return pack_codes(codes.reshape(1, -1), width)[0]


def unpack_group_codes(raw: np.ndarray, width: int, rows: int, in_features: int) -> np.ndarray:
    """The inverse of :func:`pack_group_codes`: codes ``[rows, in]``."""
    if width == 1:
        return unpack_codes(raw.reshape(rows, packed_bytes(in_features, 1)), 1, in_features)
    return unpack_codes(raw[None, :], width, rows * in_features).reshape(rows, in_features)


def quantized_weight_from_groups(data: np.ndarray, spec: Mapping[str, Any], what: str) -> QuantizedWeight:
    """A module's QuantizedWeight from its width groups in weights.bin (``data``: the file's bytes;
    ``spec``: the manifest's ``quantized_modules[module]``). The numpy decode of QuantizedWeight stays the one
    place that decodes."""

    def tensor(group: Mapping[str, Any], key: str) -> np.ndarray:
        entry = group[key]
        return data[entry["offset"] : entry["offset"] + entry["length"]].view(GROUP_TENSOR_DTYPES[key])

    out_f, in_f, group_size = int(spec["out"]), int(spec["in"]), int(spec["group_size"])
    widths = np.zeros(out_f, dtype=np.uint8)
    rows_of = {}
    for g in spec["groups"]:
        rows = tensor(g, "rows").astype(np.int64)
        widths[rows] = g["width"]
        rows_of[g["width"]] = rows
    if np.any(widths == 0):
        raise OnnxModelError(f"{what}: the manifest's row groups do not cover every row (exported with MatMulNBits "
                             "groups?); merge mode needs a model exported with --matmulnbits never")
    n_groups = -(-in_f // group_size) if group_size else 0
    qw = QuantizedWeight(out_f, in_f, group_size, widths, np.zeros(0, np.uint8), np.zeros(0, np.float16),
                         np.zeros((out_f, n_groups), np.float16))
    codes = np.zeros(int(qw.row_code_offsets[-1]), dtype=np.uint8)
    levels = np.zeros(int(qw.row_level_offsets[-1]), dtype=np.float16)
    for g in spec["groups"]:
        w, rows = int(g["width"]), rows_of[g["width"]]
        nbytes = packed_bytes(in_f, w)
        # the layer packs every row from a byte boundary; 2/4-bit groups are packed as one flat tensor
        per_row = pack_codes(unpack_group_codes(tensor(g, "codes"), w, rows.size, in_f), w)
        codes[qw.row_code_offsets[rows][:, None] + np.arange(nbytes)[None, :]] = per_row
        lv = tensor(g, "codebooks").reshape(rows.size, 1 << w)
        levels[qw.row_level_offsets[rows][:, None] + np.arange(1 << w)[None, :]] = lv
        if group_size:
            qw.scales[rows] = tensor(g, "scales").reshape(rows.size, n_groups)
    qw.codes, qw.codebooks = codes, levels
    qw.validate(what)
    return qw


# ------------------------------------------------------------------------------------------------ .onnx_adapter
def blob_adapter_parameters(blob: Blob, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A blob's factors as the graph's LoRA inputs (modules whose components were all dropped are left out:
    the zero-rank default is exact for them). The blob must be checked against the model's base first."""
    params: dict[str, np.ndarray] = {}
    for module, (up, down) in blob.all_factors(drop_empty=True).items():
        if up.shape[1] == 0:
            continue
        spec = manifest["lora_inputs"].get(module)
        if spec is None:
            raise BaseMismatchError(f"adapter module {module!r} is not a low-bit linear of this ONNX model")
        params[spec["down"]] = np.ascontiguousarray(down.T, dtype=np.float32)
        params[spec["up"]] = np.ascontiguousarray(up.T, dtype=np.float32)
    return params


def write_adapter_file(params: Mapping[str, np.ndarray], model_version: int, out_path: str | Path,
                       overwrite: bool = True) -> Path:
    """Write an ``.onnx_adapter`` (onnxruntime's AdapterFormat, which only onnxruntime serializes) atomically:
    adapter version :data:`ADAPTER_VERSION`, the model's ``model_version``, ``params`` by LoRA input name."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(ADAPTER_VERSION)
    adapter.set_model_version(model_version)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        adapter.export_adapter(str(tmp))
    return Path(out_path)


def recovery_factors(data: np.ndarray, recovery: Mapping[str, Any], what: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module -> (A [rank, in], B [out, rank]) float16 of the manifest's ``recovery`` entry, read from weights.bin's
    bytes ``data`` (the factors of ``formats.quantized_base.recovered_weight``)."""
    out = {}
    rank = int(recovery["rank"])
    for module, entry in recovery["modules"].items():
        pair = []
        for factor in ("A_t", "B_t"):
            spec = entry[factor]
            offset, length, shape = int(spec["offset"]), int(spec["length"]), [int(d) for d in spec["shape"]]
            if (spec.get("dtype") != "float16" or len(shape) != 2 or length != 2 * shape[0] * shape[1]
                    or offset + length > data.size or rank not in (shape[1] if factor == "A_t" else shape[0],)):
                raise OnnxModelError(f"{what}: the recovery factor {factor} of {module} is described as {spec}, which "
                                     "does not fit weights.bin or the rank; re-export the model")
            pair.append(data[offset : offset + length].view("<f2").reshape(shape).T)
        out[module] = (pair[0], pair[1])
    return out
