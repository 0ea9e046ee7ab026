"""Building an ONNX graph node by node: names, initializers, the arrays weights.bin holds beside it, and the
per-export state the low-bit codegen and the decoder share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from lowra.export.onnx.config import OnnxExportConfig


class Graph:
    """Nodes, initializers (bytes kept aside until the external-data file is written) and unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.side: dict[str, np.ndarray] = {}  # arrays for weights.bin that no node reads (listed in the manifest)
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def node(self, op: str, inputs: Sequence[str], hint: str | None = None, n_out: int = 1, domain: str = "",
             **attrs: Any) -> Any:
        outs = [self.name(hint or op) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: np.ndarray | Sequence[int] | float, hint: str = "c", dtype: Any = None) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.name(hint)
        self.inits[name] = onnx.numpy_helper.from_array(arr, name)
        return name

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits[name] = onnx.numpy_helper.from_array(np.ascontiguousarray(arr), name)
        return name

    def init_raw(self, name: str, data_type: int, dims: Sequence[int], raw: bytes) -> str:
        t = TensorProto(name=name, data_type=data_type, dims=list(dims), raw_data=raw)
        self.inits[name] = t
        return name


def const_node(output: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=onnx.numpy_helper.from_array(value))


def ref_constant(output: str, attr: str, ref: str) -> onnx.NodeProto:
    """A Constant node whose value is the calling node's attribute ``ref`` (a function attribute reference)."""
    node = helper.make_node("Constant", [], [output])
    node.attribute.append(helper.make_attribute_ref(attr, onnx.AttributeProto.INTS))
    node.attribute[-1].ref_attr_name = ref
    return node


@dataclass
class ExportState:
    config: OnnxExportConfig
    graph: Graph
    merge: bool
    functions: dict[str, onnx.FunctionProto] = field(default_factory=dict)
    group_index: dict[tuple[int, int], str] = field(default_factory=dict)
    module_tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    matmulnbits_groups: int = 0
    function_groups: int = 0
    recovery: Any = None  # a version-2 base's formats.quantized_base.Recovery: its term is part of the low-bit graph
