"""The low-bit linear layer in ONNX: per-width row groups decoded by a local function, or MatMulNBits.

See docs/FORMAT.md, "Low-bit linear"; the packing of each group's codes is
:func:`lowra.device_runtime.formats.onnx_manifest.pack_group_codes`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from lowra.device_runtime import formats as fmt
from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.device_runtime.formats.onnx_manifest import pack_group_codes
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.export.onnx.config import LOWRA_DOMAIN, MS_DOMAIN, OPSET
from lowra.export.onnx.graph import ExportState, const_node, ref_constant

SUB_BYTE = {2: TensorProto.UINT2, 4: TensorProto.UINT4}


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
            const_node(f"shifts_{tag}", np.arange(8, dtype=np.uint8)),
            const_node(f"one_{tag}", np.array(1, dtype=np.uint8)),
            const_node(f"ax2_{tag}", np.array([2], dtype=np.int64)),
            helper.make_node("Unsqueeze", [codes, f"ax2_{tag}"], [f"c3_{tag}"]),
            helper.make_node("BitShift", [f"c3_{tag}", f"shifts_{tag}"], [f"sh_{tag}"], direction="RIGHT"),
            helper.make_node("BitwiseAnd", [f"sh_{tag}", f"one_{tag}"], [f"bits_{tag}"]),
            const_node(f"flat_{tag}", np.array([0, -1], dtype=np.int64)),
            helper.make_node("Reshape", [f"bits_{tag}", f"flat_{tag}"], [f"bits2_{tag}"]),
            const_node(f"zero_{tag}", np.array([0], dtype=np.int64)),
            const_node(f"axis1_{tag}", np.array([1], dtype=np.int64)),
            ref_constant(f"in_dim_{tag}", "value_ints", "in_features"),
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


def _group_index(st: ExportState, in_features: int, group_size: int) -> str:
    key = (in_features, group_size)
    if key not in st.group_index:
        st.group_index[key] = st.graph.init(
            f"lowra.group_index.{in_features}.{group_size}", (np.arange(in_features) // group_size).astype(np.int64)
        )
    return st.group_index[key]


def _matmulnbits(st: ExportState, x: str, module: str, qw: QuantizedWeight, rows: np.ndarray, width: int,
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


def lowbit_linear(st: ExportState, x: str, module: str, qw: QuantizedWeight) -> str:
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
        packed = pack_group_codes(codes, width)
        if width == 1:
            c = g.init(f"{prefix}.codes", packed)
        else:
            c = g.init_raw(f"{prefix}.codes", SUB_BYTE[width], [rows.size, qw.in_features], packed.tobytes())
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
