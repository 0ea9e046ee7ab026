"""ONNX export: ``python -m lowra.export.onnx --help``.

Modules, one concern each: :mod:`.config` (OnnxExportConfig, opset, domains), :mod:`.llama` (the decoder shape),
:mod:`.graph` (node-by-node graph building), :mod:`.lowbit` (the low-bit linear: local function or MatMulNBits),
:mod:`.decoder` (the whole decoder graph), :mod:`.external_data` (weights.bin), :mod:`.exporter` (the model
directory and its manifest, blob -> ``.onnx_adapter``), :mod:`.cli`. The directory's format is
:mod:`lowra.device_runtime.formats.onnx_manifest`.
"""
from lowra.export.onnx.cli import main
from lowra.export.onnx.config import OnnxExportConfig
from lowra.export.onnx.exporter import export_onnx, size_report, write_onnx_adapter

__all__ = ["OnnxExportConfig", "export_onnx", "main", "size_report", "write_onnx_adapter"]
