"""weights.bin: one aligned external-data file shared by both graphs, and where each tensor landed in it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto

ALIGN = 64
INLINE_LIMIT = 256  # bytes; smaller initializers stay inside the graph (constants, shapes)


class ExternalData:
    """One aligned data file shared by both graphs; an initializer's bytes are written once, by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = path.open("wb")
        self.entries: dict[str, tuple[int, int]] = {}

    def externalize(self, model: onnx.ModelProto) -> None:
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                continue  # a merge placeholder
            # Tensors the manifest locates go to weights.bin whatever their size.
            located = t.name.endswith((".codes", ".codebooks", ".scales")) or t.name.startswith("recovery.")
            if len(t.raw_data) <= INLINE_LIMIT and not located:
                continue
            if t.name not in self.entries:
                pad = (-self.fh.tell()) % ALIGN
                self.fh.write(b"\0" * pad)
                self.entries[t.name] = (self.fh.tell(), len(t.raw_data))
                self.fh.write(t.raw_data)
            offset, length = self.entries[t.name]
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value

    def add_side(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Arrays no graph reads (the manifest points at them), appended after the initializers."""
        for name, arr in arrays.items():
            pad = (-self.fh.tell()) % ALIGN
            self.fh.write(b"\0" * pad)
            raw = np.ascontiguousarray(arr).tobytes()
            self.entries[name] = (self.fh.tell(), len(raw))
            self.fh.write(raw)

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def tensor_entry(model: onnx.ModelProto, name: str) -> dict[str, Any]:
    t = next(t for t in model.graph.initializer if t.name == name)
    info = {e.key: e.value for e in t.external_data}
    dtype = {TensorProto.UINT8: "uint8", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
             TensorProto.UINT2: "uint2", TensorProto.UINT4: "uint4", TensorProto.FLOAT: "float32"}[t.data_type]
    return {"offset": int(info["offset"]), "length": int(info["length"]), "dtype": dtype, "shape": list(t.dims)}
