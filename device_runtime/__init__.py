"""lowra.device_runtime: the light, torch-free side that runs on the device.

Owns every on-disk format (:mod:`.formats`) and its numpy reference codec; loads a base, verifies a user's
blob against it, merges the adapter at load time and swaps users without drift (:class:`DeviceRuntime`).
Also reads the sub-2-bit quantized base file (:mod:`.formats.quantized_base`, one layer: :class:`QuantizedWeight`).
Every engine (:class:`DeviceRuntime`, ``engines.onnx.OnnxEngine``, ``engines.executorch.ExecutorchEngine``)
implements :class:`Engine` and reports the active user as a :class:`UserInfo`.
"""
from lowra.device_runtime.engines.base import Engine, GeneratingEngine, UserInfo
from lowra.device_runtime.errors import (
    BaseMismatchError,
    BaseNotFoundError,
    BlobContentError,
    BlobError,
    BlobTruncatedError,
    ChecksumMismatchError,
    LowraError,
    UnsupportedFormatError,
)
from lowra.device_runtime.formats import FORMAT_NAME, FORMAT_VERSION, Blob, parse_blob, read_blob
from lowra.device_runtime.formats.quantized_base import QuantizedBase, read_quantized_base, write_quantized_base
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.device_runtime.runtime import BaseWeights, DeviceRuntime

__all__ = [
    "BaseMismatchError",
    "BaseNotFoundError",
    "BaseWeights",
    "Blob",
    "BlobContentError",
    "BlobError",
    "BlobTruncatedError",
    "ChecksumMismatchError",
    "DeviceRuntime",
    "Engine",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GeneratingEngine",
    "LowraError",
    "QuantizedBase",
    "QuantizedWeight",
    "UnsupportedFormatError",
    "UserInfo",
    "parse_blob",
    "read_blob",
    "read_quantized_base",
    "write_quantized_base",
]
