"""Export a Llama-family model with its LowRA low-bit base to ONNX, run by stock ONNX Runtime.

The graph is built node by node with ``onnx.helper`` rather than traced by ``torch.onnx``: the low-bit weights
must stay packed as native sub-byte initializers (UINT2/UINT4, 1-bit rows packed in uint8) and be decoded by a
custom-domain op defined as an ONNX *local function*. Tracing a ``torch.library`` op would need a translation
table for it plus a cache-export path through transformers, and still leaves constant folding and the sub-byte
dtypes to post-processing; writing the ~40 nodes of a decoder layer directly keeps every initializer's dtype and
name under our control (the adapter inputs and the merge overrides are addressed by name).

Files written to the model directory (docs/FORMAT.md, "ONNX model directory"):

- ``weights.bin``: every initializer's bytes (external data shared by both graphs, 64-byte aligned);
- ``model.onnx``: the low-bit graph. Each quantized linear's rows are grouped by width (1, 2, 4 bits: uint8-packed,
  UINT2, UINT4 codes) and the layer is one call of the local function ``ai.lowra::LowBitLinear_<widths>``, which
  decodes every group (Cast + GatherElements on per-row codebooks), puts the rows back in order with one
  ``Gather`` over a fixed permutation (exact: it only moves values) and multiplies once. With ``--matmulnbits
  affine`` a 2/4-bit group whose codebooks are affine is a ``com.microsoft::MatMulNBits`` node instead.
  Every quantized linear also has LoRA inputs ``lora.<module>.down_t`` [in, r] and
  ``lora.<module>.up_t`` [r, out] with zero-rank default initializers, so a ``.onnx_adapter`` switches users;
- ``model_merge.onnx``: the same model whose quantized linears read float32 ``<module>.weight`` initializers
  declared as external data at a placeholder location: the runtime always supplies them
  (``SessionOptions.add_external_initializers``) with the user's merged weights (merge at load);
- ``tokenizer.json`` and ``lowra_onnx.json`` (the manifest: base fingerprint material, opset, adapter input
  names, where each module's packed tensors sit in ``weights.bin``).

One graph serves prefill and decode: ``input_ids`` [S] plus ``past_key.<i>``/``past_value.<i>`` [kv_heads, P, D]
(P = 0 for a prefill) give ``logits`` [S, vocab] and ``present_*`` [kv_heads, P + S, D]. Batch size is 1.

CLI: ``python -m lowra.export.onnx --help``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from lowra.device_runtime import formats as fmt
from lowra.device_runtime.engines.onnx import (
    LORA_DOWN,
    LORA_UP,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MERGE_PLACEHOLDER,
    WEIGHTS_NAME,
    model_version_of,
)
from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight

__all__ = ["OnnxExportConfig", "export_onnx", "main"]

OPSET = 25  # UINT2 needs >= 25; ORT 1.32 has no kernels for the opset-28 DequantizeLinear (ENVIRONMENT.md)
LOWRA_DOMAIN = "ai.lowra"
MS_DOMAIN = "com.microsoft"
ALIGN = 64
INLINE_LIMIT = 256  # bytes; smaller initializers stay inside the graph (constants, shapes)
NEG_LARGE = float(np.finfo(np.float32).min)  # masked scores, as transformers' eager attention uses
SUB_BYTE = {2: TensorProto.UINT2, 4: TensorProto.UINT4}


@dataclass
class OnnxExportConfig:
    """``matmulnbits``: "never" or "affine" (2/4-bit row groups whose codebooks are affine use MatMulNBits).

    ``dense_dtype``: storage of the dense tensors (embeddings, norms, head); cast to float32 in the graph.
    ``max_positions``: the longest sequence (prompt + generated) the engine allows; default: the model config's.
    """

    matmulnbits: str = "never"
    dense_dtype: str = "float16"
    max_positions: int | None = None
    matmulnbits_block_size: int = 64
    # 0: float32 compute (exact up to rounding); 4: int8 activations (ORT's fast path, approximate)
    matmulnbits_accuracy_level: int = 0
    affine_tolerance: float = 2.0**-10  # relative to the row's largest |level|: fp16 rounding of the levels

    def __post_init__(self) -> None:
        if self.matmulnbits not in ("never", "affine"):
            raise ValueError(f"matmulnbits={self.matmulnbits!r}; expected 'never' or 'affine'")
        if self.dense_dtype not in ("float16", "float32"):
            raise ValueError(f"dense_dtype={self.dense_dtype!r}; expected 'float16' or 'float32'")
        b = self.matmulnbits_block_size
        if b < 16 or b & (b - 1):
            raise ValueError(f"matmulnbits_block_size={b}; MatMulNBits needs a power of two >= 16")


# ------------------------------------------------------------------------------------------------ llama config
@dataclass(frozen=True)
class LlamaShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    max_positions: int
    tied: bool

    @classmethod
    def from_config(cls, config: Any) -> "LlamaShape":
        model_type = getattr(config, "model_type", "")
        if model_type not in ("llama", "mistral", "qwen2", "smollm3") and not model_type.startswith("llama"):
            raise ValueError(f"model_type {model_type!r} is not a Llama-family decoder this exporter supports")
        rope = getattr(config, "rope_scaling", None) or {}
        params = getattr(config, "rope_parameters", None) or {}
        kind = rope.get("rope_type", rope.get("type")) or params.get("rope_type") or "default"
        if kind != "default":
            raise ValueError(f"rope type {kind!r} is not supported (default RoPE only); export refused")
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ValueError("the model config has no rope_theta")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("attention/MLP biases are not supported by this exporter")
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            vocab=int(config.vocab_size), hidden=int(config.hidden_size), layers=int(config.num_hidden_layers),
            heads=heads, kv_heads=int(config.num_key_value_heads), head_dim=head_dim,
            eps=float(config.rms_norm_eps), rope_theta=float(theta),
            max_positions=int(config.max_position_embeddings), tied=bool(config.tie_word_embeddings),
        )


def linear_names(layer: int) -> list[str]:
    p = f"model.layers.{layer}"
    return [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"{p}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
    ]


# ------------------------------------------------------------------------------------------------ graph builder
class _Graph:
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


def _onnx_packed(rows_codes: np.ndarray, width: int) -> bytes:
    """Codes [rows, in] (values < 2**width) packed as ONNX packs UINT2/UINT4: the flat tensor LSB-first."""
    return fmt.pack_codes(rows_codes.reshape(1, -1), width)[0].tobytes()


def _row_codes(qw: QuantizedWeight, rows: np.ndarray) -> np.ndarray:
    """Unpacked codes [len(rows), in] of the given rows (all of one width)."""
    w = int(qw.widths[rows[0]])
    nbytes = fmt.packed_bytes(qw.in_features, w)
    off = qw.row_code_offsets
    packed = qw.codes[off[rows][:, None] + np.arange(nbytes)[None, :]]
    return fmt.unpack_codes(packed, w, qw.in_features)


def _row_levels(qw: QuantizedWeight, rows: np.ndarray) -> np.ndarray:
    w = int(qw.widths[rows[0]])
    off = qw.row_level_offsets
    return qw.codebooks[off[rows][:, None] + np.arange(1 << w)[None, :]]


def _const_node(output: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=onnx.numpy_helper.from_array(value))


def _group_decode_nodes(width: int, grouped: bool, tag: str) -> tuple[list[str], list[onnx.NodeProto], str]:
    """Inputs and nodes that decode one width group to float32 ``w_<tag>`` [rows, in]:
    W[r, j] = codebooks[r, codes[r, j]] (* scales[r, group_index[j]]). Cast + GatherElements is an exact table
    lookup, so stock ONNX Runtime reproduces the numpy reference decode bit for bit."""
    codes, levels = f"codes_{tag}", f"codebooks_{tag}"
    inputs = [codes, levels] + ([f"scales_{tag}"] if grouped else [])
    nodes: list[onnx.NodeProto] = []
    idx = f"idx_{tag}"
    if width == 1:
        # uint8 [rows, nbytes] -> bits [rows, nbytes, 8] LSB first -> [rows, in]. in_features comes from an
        # attribute, not Shape(x), so every input of the decode is a constant that ONNX Runtime can fold.
        nodes += [
            _const_node(f"shifts_{tag}", np.arange(8, dtype=np.uint8)),
            _const_node(f"one_{tag}", np.array(1, dtype=np.uint8)),
            _const_node(f"ax2_{tag}", np.array([2], dtype=np.int64)),
            helper.make_node("Unsqueeze", [codes, f"ax2_{tag}"], [f"c3_{tag}"]),
            helper.make_node("BitShift", [f"c3_{tag}", f"shifts_{tag}"], [f"sh_{tag}"], direction="RIGHT"),
            helper.make_node("BitwiseAnd", [f"sh_{tag}", f"one_{tag}"], [f"bits_{tag}"]),
            _const_node(f"flat_{tag}", np.array([0, -1], dtype=np.int64)),
            helper.make_node("Reshape", [f"bits_{tag}", f"flat_{tag}"], [f"bits2_{tag}"]),
            _const_node(f"zero_{tag}", np.array([0], dtype=np.int64)),
            _const_node(f"axis1_{tag}", np.array([1], dtype=np.int64)),
            _ref_constant(f"in_dim_{tag}", "value_ints", "in_features"),
            helper.make_node("Slice", [f"bits2_{tag}", f"zero_{tag}", f"in_dim_{tag}", f"axis1_{tag}"], [f"u8_{tag}"]),
            helper.make_node("Cast", [f"u8_{tag}"], [idx], to=TensorProto.INT64),
        ]
    else:
        nodes.append(helper.make_node("Cast", [codes], [idx], to=TensorProto.INT64))
    nodes += [
        helper.make_node("GatherElements", [levels, idx], [f"w16_{tag}"], axis=1),
        helper.make_node("Cast", [f"w16_{tag}"], [f"wl_{tag}"], to=TensorProto.FLOAT),
    ]
    if grouped:
        nodes += [
            helper.make_node("Gather", [f"scales_{tag}", "group_index"], [f"s16_{tag}"], axis=1),
            helper.make_node("Cast", [f"s16_{tag}"], [f"s_{tag}"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"wl_{tag}", f"s_{tag}"], [f"w_{tag}"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", [f"wl_{tag}"], [f"w_{tag}"]))
    return inputs, nodes, f"w_{tag}"


def _linear_function(widths: tuple[int, ...], grouped: bool) -> onnx.FunctionProto:
    """``ai.lowra::LowBitLinear_<widths>[Grouped](x, (codes_w, codebooks_w[, scales_w]) per width
    [, group_index][, row_order]) -> x @ W^T``.

    Each width group decodes to its rows of W; the groups are concatenated and ``Gather(row_order, axis=0)``
    puts the rows back in the layer's order (exact: it only moves values), then one Gemm. Every input but x is
    an initializer, so with constant folding on ONNX Runtime turns the decode into one float32 weight at
    session creation; with it off the decode runs inside every call.
    """
    inputs, nodes, parts = ["x"], [], []
    for width in widths:
        ins, body, out = _group_decode_nodes(width, grouped, str(width))
        inputs += ins
        nodes += body
        parts.append(out)
    if grouped:
        inputs.append("group_index")
    if len(parts) > 1:
        inputs.append("row_order")
        nodes += [helper.make_node("Concat", parts, ["w_cat"], axis=0),
                  helper.make_node("Gather", ["w_cat", "row_order"], ["w"], axis=0)]
    else:
        nodes.append(helper.make_node("Identity", parts, ["w"]))
    nodes.append(helper.make_node("Gemm", ["x", "w"], ["y"], transB=1))
    return helper.make_function(LOWRA_DOMAIN, _function_name(widths, grouped), inputs, ["y"], nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["in_features"] if 1 in widths else [])


def _function_name(widths: tuple[int, ...], grouped: bool) -> str:
    return "LowBitLinear_" + "_".join(map(str, widths)) + ("_grouped" if grouped else "")


def _ref_constant(output: str, attr: str, ref: str) -> onnx.NodeProto:
    """A Constant node whose value is the calling node's attribute ``ref`` (a function attribute reference)."""
    node = helper.make_node("Constant", [], [output])
    node.attribute.append(helper.make_attribute_ref(attr, onnx.AttributeProto.INTS))
    node.attribute[-1].ref_attr_name = ref
    return node


def _affine(levels: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(offset [rows], step [rows]) when every row's levels are offset + k * step within ``tol`` * max|level|."""
    lv = levels.astype(np.float64)
    n = lv.shape[1]
    step = (lv[:, -1] - lv[:, 0]) / (n - 1)
    fit = lv[:, :1] + step[:, None] * np.arange(n)[None, :]
    scale = np.maximum(np.abs(lv).max(1), 1e-30)
    if np.any(step <= 0) or np.any(np.abs(fit - lv).max(1) > tol * scale):
        return None
    return lv[:, 0], step


@dataclass
class _ExportState:
    config: OnnxExportConfig
    graph: _Graph
    merge: bool
    functions: dict[str, onnx.FunctionProto] = field(default_factory=dict)
    group_index: dict[tuple[int, int], str] = field(default_factory=dict)
    module_tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    matmulnbits_groups: int = 0
    function_groups: int = 0


def _group_index(st: _ExportState, in_features: int, group_size: int) -> str:
    key = (in_features, group_size)
    if key not in st.group_index:
        st.group_index[key] = st.graph.init(
            f"lowra.group_index.{in_features}.{group_size}", (np.arange(in_features) // group_size).astype(np.int64)
        )
    return st.group_index[key]


def _matmulnbits(st: _ExportState, x: str, module: str, qw: QuantizedWeight, rows: np.ndarray, width: int,
                 offset: np.ndarray, step: np.ndarray) -> str:
    """y = x @ W_rows^T for rows whose levels are ``offset + code * step`` (times the group scale).

    MatMulNBits computes ``(code - z) * scale`` per block. Its fast CPU kernels need the default zero point
    ``z = 2**(bits-1)`` or uint8 zero points (a float zero point was ~10x slower here, measured in the bench),
    and a symmetric grid has a half-integer one (7.5 at 4 bits), so the node keeps the default and the rest of the
    offset is added back exactly: ``W = (code - z) * scale + c`` with ``c = offset * group_scale + z * scale`` per
    (row, block), i.e. ``y += blocksum(x) @ c^T`` (a [S, n_blocks] x [n_blocks, rows] product).
    """
    g, cfg = st.graph, st.config
    block = qw.group_size if qw.group_size else cfg.matmulnbits_block_size
    k = qw.in_features
    n_blocks = -(-k // block)
    codes = _row_codes(qw, rows)
    padded = np.zeros((rows.size, n_blocks * block), dtype=np.uint8)
    padded[:, :k] = codes
    packed = fmt.pack_codes(padded.reshape(rows.size * n_blocks, block), width).reshape(rows.size, n_blocks, -1)
    if qw.group_size:
        group_scale = qw.scales[rows].astype(np.float64)  # [rows, n_groups] == [rows, n_blocks]
    else:
        group_scale = np.ones((rows.size, n_blocks), dtype=np.float64)
    scale = group_scale * step[:, None]
    zero = float(1 << (width - 1))
    correction = offset[:, None] * group_scale + zero * scale  # [rows, n_blocks]
    b = g.init(f"{module}.w{width}.nbits", packed)
    s = g.init(f"{module}.w{width}.nbits_scales", scale.astype(np.float32).reshape(-1))
    st.matmulnbits_groups += 1
    y = g.node("MatMulNBits", [x, b, s], f"{module}.w{width}.nbits_y", domain=MS_DOMAIN, K=k, N=int(rows.size),
               bits=width, block_size=block, accuracy_level=cfg.matmulnbits_accuracy_level)
    if n_blocks * block != k:
        xp = g.node("Pad", [x, g.const([0, 0, 0, n_blocks * block - k], dtype=np.int64)])
    else:
        xp = x
    sums = g.node("ReduceSum", [g.node("Reshape", [xp, g.const([0, n_blocks, block], dtype=np.int64)]),
                                g.const([-1], dtype=np.int64)], keepdims=0)  # [S, n_blocks]
    c = g.init(f"{module}.w{width}.nbits_offset", correction.T.astype(np.float32))  # [n_blocks, rows]
    return g.node("Add", [y, g.node("MatMul", [sums, c])], f"{module}.w{width}.y")


def _lowbit_linear(st: _ExportState, x: str, module: str, qw: QuantizedWeight) -> str:
    g = st.graph
    grouped = qw.group_size > 0
    record: dict[str, Any] = {"out": qw.out_features, "in": qw.in_features, "group_size": qw.group_size, "groups": []}
    outs: list[str] = []  # MatMulNBits outputs, then the function's
    order: list[np.ndarray] = []
    fn_widths: list[int] = []
    fn_rows: list[np.ndarray] = []
    fn_args: list[str] = []
    for width in CODED_WIDTHS:
        rows = np.nonzero(qw.widths == width)[0]
        if rows.size == 0:
            continue
        levels = _row_levels(qw, rows)
        affine = _affine(levels, st.config.affine_tolerance) if (st.config.matmulnbits == "affine" and width in SUB_BYTE) else None
        if affine is not None:
            outs.append(_matmulnbits(st, x, module, qw, rows, width, *affine))
            order.append(rows)
            continue
        codes = _row_codes(qw, rows)
        prefix = f"{module}.w{width}"
        if width == 1:
            c = g.init(f"{prefix}.codes", fmt.pack_codes(codes, 1))
        else:
            c = g.init_raw(f"{prefix}.codes", SUB_BYTE[width], [rows.size, qw.in_features], _onnx_packed(codes, width))
        cb = g.init(f"{prefix}.codebooks", levels.astype(np.float16))
        fn_args += [c, cb]
        rec = {"width": width, "rows": f"{prefix}.rows", "codes": c, "codebooks": cb}
        if grouped:
            sc = g.init(f"{prefix}.scales", qw.scales[rows].astype(np.float16))
            fn_args.append(sc)
            rec["scales"] = sc
        g.side[f"{prefix}.rows"] = rows.astype(np.int32)  # not in the graph: the engine rebuilds the layer (merge)
        record["groups"].append(rec)
        fn_widths.append(width)
        fn_rows.append(rows)
        st.function_groups += 1
    st.module_tensors[module] = record
    if fn_widths:
        name = _function_name(tuple(fn_widths), grouped)
        if name not in st.functions:
            st.functions[name] = _linear_function(tuple(fn_widths), grouped)
        if grouped:
            fn_args.append(_group_index(st, qw.in_features, qw.group_size))
        rows = np.concatenate(fn_rows)
        if len(fn_rows) > 1:
            # the function returns its rows in ascending layer order: row k of W is group row position[k]
            position = np.argsort(rows, kind="stable")
            fn_args.append(g.init(f"{module}.row_order", position.astype(np.int32)))
            rows = np.sort(rows)
        attrs = {"in_features": [qw.in_features]} if 1 in fn_widths else {}
        outs.append(g.node(name, [x, *fn_args], f"{module}.lowbit_y", domain=LOWRA_DOMAIN, **attrs))
        order.append(rows)
    if len(outs) == 1:
        return outs[0]
    perm = np.concatenate(order)  # only when MatMulNBits groups and others share a layer
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.size)
    cat = g.node("Concat", outs, f"{module}.cat", axis=-1)
    return g.node("Gather", [cat, g.init(f"{module}.output_order", inverse.astype(np.int32))], f"{module}.y", axis=1)


def _linear(st: _ExportState, x: str, module: str, quantized: Mapping[str, QuantizedWeight],
            dense_weights: Mapping[str, np.ndarray], lora_inputs: list[tuple[str, int, int]]) -> str:
    g = st.graph
    if module in quantized and st.merge:
        name = f"{module}.weight"
        qw = quantized[module]
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[qw.out_features, qw.in_features])
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", MERGE_PLACEHOLDER), ("offset", "0"), ("length", str(4 * qw.out_features * qw.in_features))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        g.inits[name] = t
        return g.node("Gemm", [x, name], f"{module}.y", transB=1)
    if module in quantized:
        y = _lowbit_linear(st, x, module, quantized[module])
        qw = quantized[module]
        down, up = LORA_DOWN.format(module=module), LORA_UP.format(module=module)
        # Zero-rank defaults: with no adapter active the LoRA branch is x @ [in, 0] @ [0, out] = 0.
        g.init(down, np.zeros((qw.in_features, 0), np.float32))
        g.init(up, np.zeros((0, qw.out_features), np.float32))
        rank = f"rank.{module}"
        g.inputs.append(helper.make_tensor_value_info(down, TensorProto.FLOAT, [qw.in_features, rank]))
        g.inputs.append(helper.make_tensor_value_info(up, TensorProto.FLOAT, [rank, qw.out_features]))
        lora_inputs.append((module, qw.in_features, qw.out_features))
        delta = g.node("MatMul", [g.node("MatMul", [x, down], f"{module}.lora_h"), up], f"{module}.lora_y")
        return g.node("Add", [y, delta], f"{module}.out")
    return g.node("Gemm", [x, g.init(f"{module}.weight", dense_weights[f"{module}.weight"].astype(np.float32))],
                  f"{module}.y", transB=1)


def _dense(st: _ExportState, name: str, arr: np.ndarray) -> str:
    g = st.graph
    dtype = np.float16 if st.config.dense_dtype == "float16" else np.float32
    stored = g.init(name, np.asarray(arr).astype(dtype))
    return stored if dtype == np.float32 else g.node("Cast", [stored], name + ".f32", to=TensorProto.FLOAT)


def _rms_norm(st: _ExportState, x: str, weight: str, eps: float) -> str:
    g = st.graph
    sq = g.node("Mul", [x, x])
    mean = g.node("ReduceMean", [sq, g.const([-1], dtype=np.int64)], keepdims=1)
    rms = g.node("Sqrt", [g.node("Add", [mean, g.const(np.float32(eps))])])
    return g.node("Mul", [g.node("Div", [x, rms]), weight])


def _build(shape: LlamaShape, quantized: Mapping[str, QuantizedWeight], dense: Mapping[str, np.ndarray],
           config: OnnxExportConfig, merge: bool) -> tuple[onnx.ModelProto, _ExportState, list[tuple[str, int, int]]]:
    st = _ExportState(config=config, graph=_Graph(), merge=merge)
    g = st.graph
    lora_inputs: list[tuple[str, int, int]] = []
    H, KV, D = shape.heads, shape.kv_heads, shape.head_dim
    g.inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["seq"]))
    for i in range(shape.layers):
        for kind in ("key", "value"):
            g.inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, [KV, "past", D]))
    g.outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["seq", shape.vocab]))

    embed = _dense(st, "model.embed_tokens.weight", dense["model.embed_tokens.weight"])
    h = g.node("Gather", [embed, "input_ids"], "embeds", axis=0)  # [S, hidden]
    # positions P .. P+S-1 where P is the cached length
    past_len = g.node("Shape", ["past_key.0"], "past_len", start=1, end=2)
    seq_len = g.node("Shape", ["input_ids"], "seq_len")
    total = g.node("Add", [past_len, seq_len], "total_len")
    scalar = g.const([], dtype=np.int64)
    pos = g.node("Range", [g.node("Reshape", [past_len, scalar]), g.node("Reshape", [total, scalar]),
                           g.const(np.int64(1))], "positions")
    inv_freq = 1.0 / (shape.rope_theta ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / D))
    freqs = g.node("Mul", [g.node("Unsqueeze", [g.node("Cast", [pos], to=TensorProto.FLOAT), g.const([1], dtype=np.int64)]),
                           g.const(inv_freq.astype(np.float32)[None, :], "inv_freq")])
    emb = g.node("Concat", [freqs, freqs], axis=-1)
    cos, sin = g.node("Cos", [emb], "cos"), g.node("Sin", [emb], "sin")  # [S, D]
    # causal mask [S, T]: key position k visible to query position q iff k <= q
    keys = g.node("Range", [g.const(np.int64(0)), g.node("Reshape", [total, scalar]), g.const(np.int64(1))], "key_pos")
    visible = g.node("LessOrEqual", [g.node("Unsqueeze", [keys, g.const([0], dtype=np.int64)]),
                                     g.node("Unsqueeze", [pos, g.const([1], dtype=np.int64)])])
    mask = g.node("Where", [visible, g.const(np.float32(0.0)), g.const(np.float32(NEG_LARGE))], "mask")
    rep_mask = g.node("Tile", [mask, g.const([H // KV, 1], dtype=np.int64)], "rep_mask")
    scaling = g.const(np.float32(D**-0.5), "scaling")
    split = g.const([D // 2, D // 2], dtype=np.int64)

    def rope(t: str) -> str:  # t [heads, S, D]; transformers' rotate_half convention
        a, b = g.node("Split", [t, split], n_out=2, axis=-1)
        rotated = g.node("Concat", [g.node("Neg", [b]), a], axis=-1)
        return g.node("Add", [g.node("Mul", [t, cos]), g.node("Mul", [rotated, sin])])

    def heads(t: str, n: int) -> str:  # [S, n*D] -> [n, S, D]
        return g.node("Transpose", [g.node("Reshape", [t, g.const([0, n, D], dtype=np.int64)])], perm=[1, 0, 2])

    for i in range(shape.layers):
        p = f"model.layers.{i}"
        q_, k_, v_, o_, gate_, up_, down_ = linear_names(i)
        lin = lambda x, m: _linear(st, x, m, quantized, dense, lora_inputs)  # noqa: E731
        x = _rms_norm(st, h, _dense(st, f"{p}.input_layernorm.weight", dense[f"{p}.input_layernorm.weight"]), shape.eps)
        q = rope(heads(lin(x, q_), H))
        k = rope(heads(lin(x, k_), KV))
        v = heads(lin(x, v_), KV)
        k_all = g.node("Concat", [f"past_key.{i}", k], axis=1)
        v_all = g.node("Concat", [f"past_value.{i}", v], axis=1)
        g.nodes.append(helper.make_node("Identity", [k_all], [f"present_key.{i}"]))
        g.nodes.append(helper.make_node("Identity", [v_all], [f"present_value.{i}"]))
        # GQA without repeating K/V: query head h uses kv head h // (H / KV); group the queries instead.
        qg = g.node("Reshape", [q, g.const([KV, -1, D], dtype=np.int64)])  # [KV, rep*S, D]
        scores = g.node("Mul", [g.node("MatMul", [qg, g.node("Transpose", [k_all], perm=[0, 2, 1])]), scaling])
        # query rows are (rep, S) flattened: the [S, T] mask repeats rep times along the rows
        probs = g.node("Softmax", [g.node("Add", [scores, rep_mask])], axis=-1)
        ctx = g.node("MatMul", [probs, v_all])  # [KV, rep*S, D] == [H, S, D]
        ctx = g.node("Reshape", [g.node("Transpose", [g.node("Reshape", [ctx, g.const([H, -1, D], dtype=np.int64)])],
                                        perm=[1, 0, 2]), g.const([-1, H * D], dtype=np.int64)])
        h = g.node("Add", [h, lin(ctx, o_)], f"{p}.attn_residual")
        x = _rms_norm(st, h, _dense(st, f"{p}.post_attention_layernorm.weight",
                                    dense[f"{p}.post_attention_layernorm.weight"]), shape.eps)
        gate = lin(x, gate_)
        act = g.node("Mul", [gate, g.node("Sigmoid", [gate])])
        h = g.node("Add", [h, lin(g.node("Mul", [act, lin(x, up_)]), down_)], f"{p}.mlp_residual")
    for i in range(shape.layers):
        for kind in ("key", "value"):
            g.outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, [KV, "total", D]))
    x = _rms_norm(st, h, _dense(st, "model.norm.weight", dense["model.norm.weight"]), shape.eps)
    head = embed if shape.tied else _dense(st, "lm_head.weight", dense["lm_head.weight"])
    g.nodes.append(helper.make_node("Gemm", [x, head], ["logits"], transB=1))
    graph = helper.make_graph(g.nodes, "lowra_llama", g.inputs, g.outputs, list(g.inits.values()))
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(LOWRA_DOMAIN, 1)]
    if st.matmulnbits_groups:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=list(st.functions.values()),
                              producer_name="lowra")
    return model, st, lora_inputs


# ------------------------------------------------------------------------------------------------ files
class _ExternalData:
    """One aligned data file shared by both graphs; an initializer's bytes are written once, by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = path.open("wb")
        self.entries: dict[str, tuple[int, int]] = {}

    def externalize(self, model: onnx.ModelProto) -> None:
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                continue  # a merge placeholder
            if len(t.raw_data) <= INLINE_LIMIT and not t.name.endswith((".codes", ".codebooks", ".scales")):
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


def _tensor_entry(model: onnx.ModelProto, name: str) -> dict[str, Any]:
    t = next(t for t in model.graph.initializer if t.name == name)
    info = {e.key: e.value for e in t.external_data}
    dtype = {TensorProto.UINT8: "uint8", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
             TensorProto.UINT2: "uint2", TensorProto.UINT4: "uint4", TensorProto.FLOAT: "float32"}[t.data_type]
    return {"offset": int(info["offset"]), "length": int(info["length"]), "dtype": dtype, "shape": list(t.dims)}


def _dense_tensors(model: Any) -> dict[str, np.ndarray]:
    """Every non-linear tensor the graph needs, float32 numpy, from a torch model (embeddings, norms, head)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("embed_tokens.weight", "norm.weight", "layernorm.weight")) or name == "lm_head.weight":
            out[name] = tensor.detach().to("cpu").float().numpy()
    return out


def _write_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        src = src / "tokenizer.json" if src.is_dir() else src
        (out_dir / "tokenizer.json").write_bytes(src.read_bytes())
        return
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError("tokenizer must be a path to tokenizer.json or a transformers fast tokenizer")
    backend.save(str(out_dir / "tokenizer.json"))


def export_onnx(
    model: Any,
    quantized: Mapping[str, QuantizedWeight],
    tokenizer: Any,
    out_dir: str | Path,
    config: OnnxExportConfig | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the ONNX model directory for ``model`` (a transformers Llama-family causal LM, fp32) whose linear
    layers named in ``quantized`` use the low-bit base. Modules not in ``quantized`` stay float32 (with an empty
    ``quantized`` this is the fp32 ONNX of the model). Dense tensors are taken from ``model``. Returns the manifest.

    The directory is built in a sibling temp folder and renamed into place, so a crash never leaves a half
    written model under ``out_dir``.
    """
    config = config or OnnxExportConfig()
    shape = LlamaShape.from_config(model.config)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    for m in quantized:
        if not any(m in linear_names(i) for i in range(shape.layers)):
            raise ValueError(f"quantized module {m!r} is not a decoder linear of this model")
    dense = _dense_tensors(model)
    for m in (n for i in range(shape.layers) for n in linear_names(i)):
        if m not in quantized:
            dense[f"{m}.weight"] = model.get_submodule(m).weight.detach().float().numpy()
    if config.dense_dtype == "float16":
        dense = {k: (v.astype(np.float16).astype(np.float32) if not k.endswith("_proj.weight") else v) for k, v in dense.items()}
    max_positions = min(config.max_positions or shape.max_positions, shape.max_positions)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        lowbit, st, lora_inputs = _build(shape, quantized, dense, config, merge=False)
        merged, _, _ = _build(shape, quantized, dense, config, merge=True) if quantized else (None, None, None)
        data = _ExternalData(tmp / WEIGHTS_NAME)
        data.externalize(lowbit)
        if merged is not None:
            data.externalize(merged)
        data.add_side(st.graph.side)
        data.close()
        onnx.save_model(lowbit, tmp / "model.onnx")
        if merged is not None:
            onnx.save_model(merged, tmp / "model_merge.onnx")
        _write_tokenizer(tokenizer, tmp)
        digests = {m: fmt.tensor_digest(qw.dequantize()) for m, qw in quantized.items()}
        for i in range(shape.layers):
            for m in linear_names(i):
                if m not in quantized:
                    digests[m] = fmt.tensor_digest(dense[f"{m}.weight"])
        modules = {}
        for m, rec in st.module_tensors.items():
            groups = []
            for gr in rec["groups"]:
                rows = st.graph.side[gr["rows"]]
                offset, length = data.entries[gr["rows"]]
                entry = {"width": gr["width"], "rows": {"offset": offset, "length": length, "dtype": "int32",
                                                        "shape": list(rows.shape)}}
                entry.update({k: _tensor_entry(lowbit, gr[k]) for k in ("codes", "codebooks", "scales") if k in gr})
                groups.append(entry)
            modules[m] = {"out": rec["out"], "in": rec["in"], "group_size": rec["group_size"], "groups": groups}
        shapes = {m: [int(quantized[m].out_features), int(quantized[m].in_features)] if m in quantized
                  else list(dense[f"{m}.weight"].shape) for m in digests}
        manifest = {
            "format": "lowra-onnx",
            "format_version": MANIFEST_VERSION,
            "opset": OPSET,
            "domains": {LOWRA_DOMAIN: 1, **({MS_DOMAIN: 1} if st.matmulnbits_groups else {})},
            "graphs": {"lowbit": "model.onnx", **({"merge": "model_merge.onnx"} if merged is not None else {})},
            "weights": WEIGHTS_NAME,
            "model": {"vocab": shape.vocab, "layers": shape.layers, "kv_heads": shape.kv_heads,
                      "head_dim": shape.head_dim, "max_positions": max_positions},
            "base": {"digests": digests, "shapes": shapes},
            "model_version": model_version_of(digests, shapes),
            "lora_inputs": {m: {"down": LORA_DOWN.format(module=m), "up": LORA_UP.format(module=m), "in": i, "out": o}
                            for m, i, o in lora_inputs},
            "quantized_modules": modules,
            "merge_weights": sorted(f"{m}.weight" for m in quantized),
            "counts": {"function_groups": st.function_groups, "matmulnbits_groups": st.matmulnbits_groups},
            "dense_dtype": config.dense_dtype,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shipped and read
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def size_report(model_dir: str | Path, packed_payload_bytes: int | None = None) -> dict[str, int | float]:
    """Bytes of each file of a model directory (and the ratio to a packed payload, e.g. the lowra base file)."""
    d = Path(model_dir)
    report: dict[str, int | float] = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
    report["lowbit_graph_total"] = report.get("model.onnx", 0) + report.get(WEIGHTS_NAME, 0)
    if packed_payload_bytes:
        report["packed_payload"] = int(packed_payload_bytes)
        report["ratio_to_packed"] = report["lowbit_graph_total"] / packed_payload_bytes
    return report


# ------------------------------------------------------------------------------------------------ CLI
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

    from lowra.device_runtime.engines.onnx import write_onnx_adapter
    from lowra.device_runtime.formats.quantized_base import read_quantized_base
    from lowra.sdk.base_model import load_base

    base = load_base(args.base)
    qbase = read_quantized_base(args.quantized)
    manifest = export_onnx(base.model, qbase.layers, base.tokenizer, args.out,
                           OnnxExportConfig(matmulnbits=args.matmulnbits, dense_dtype=args.dense_dtype,
                                            max_positions=args.max_positions), overwrite=args.overwrite)
    for blob in args.adapter:
        path = write_onnx_adapter(args.out, blob, Path(args.out) / (Path(blob).stem + ".onnx_adapter"))
        print(f"wrote {path}")
    print(json.dumps(size_report(args.out, qbase.file_bytes), indent=1))
    print(f"opset {manifest['opset']}, {manifest['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
