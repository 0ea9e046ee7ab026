"""``python -m lowra.export.onnx``: export a quantized base to an ONNX model directory (and convert blobs)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from lowra.export.onnx.config import OnnxExportConfig
from lowra.export.onnx.exporter import export_onnx, size_report, write_onnx_adapter


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowra.export.onnx",
        description="Export a Llama-family base with its LowRA low-bit weights to an ONNX model directory "
        "(model.onnx + model_merge.onnx + weights.bin + tokenizer.json + lowra_onnx.json), and optionally "
        "convert user blobs to .onnx_adapter files.",
    )
    parser.add_argument("--base", default=None, help="HF model folder the base was quantized from (default: embedded SmolLM2)")
    parser.add_argument("--quantized", required=True, help="quantized base file written by `lowra quantize-base`")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--matmulnbits", choices=("never", "affine"), default="never",
                        help="use com.microsoft::MatMulNBits for 2/4-bit row groups with affine codebooks")
    parser.add_argument("--dense-dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--max-positions", type=int, default=None)
    parser.add_argument("--adapter", action="append", default=[], metavar="BLOB",
                        help="also write BLOB's .onnx_adapter next to the model (repeatable)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from lowra.device_runtime.formats.quantized_base import read_quantized_base
    from lowra.sdk.base_model import load_base

    base = load_base(args.base)
    qbase = read_quantized_base(args.quantized)
    manifest = export_onnx(base.model, qbase.layers, base.tokenizer, args.out,
                           OnnxExportConfig(matmulnbits=args.matmulnbits, dense_dtype=args.dense_dtype,
                                            max_positions=args.max_positions), overwrite=args.overwrite,
                           recovery=qbase.recovery)
    for blob in args.adapter:
        path = write_onnx_adapter(args.out, blob, Path(args.out) / (Path(blob).stem + ".onnx_adapter"))
        print(f"wrote {path}")
    print(json.dumps(size_report(args.out, qbase.file_bytes), indent=1))
    print(f"opset {manifest['opset']}, {manifest['counts']}")
    return 0
