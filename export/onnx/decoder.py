"""The decoder graph: embeddings, RoPE, grouped-query attention with a KV cache, SwiGLU MLP, RMSNorm and the head,
with every linear quantized (low-bit + LoRA inputs), merged (float32 supplied at session creation) or dense."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from lowra.device_runtime.formats.onnx_manifest import LORA_DOWN, LORA_UP, MERGE_PLACEHOLDER, RECOVERY_TENSOR
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.export.onnx.config import LOWRA_DOMAIN, MS_DOMAIN, OPSET, OnnxExportConfig
from lowra.export.onnx.graph import ExportState, Graph
from lowra.export.onnx.llama import LlamaShape, linear_names
from lowra.export.onnx.lowbit import lowbit_linear

NEG_LARGE = float(np.finfo(np.float32).min)  # masked scores, as transformers' eager attention uses


def _linear(st: ExportState, x: str, module: str, quantized: Mapping[str, QuantizedWeight],
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
        y = lowbit_linear(st, x, module, quantized[module])
        qw = quantized[module]
        down, up = LORA_DOWN.format(module=module), LORA_UP.format(module=module)
        # Zero-rank defaults: with no adapter active the LoRA branch is x @ [in, 0] @ [0, out] = 0.
        g.init(down, np.zeros((qw.in_features, 0), np.float32))
        g.init(up, np.zeros((0, qw.out_features), np.float32))
        rank = f"rank.{module}"
        g.inputs.append(helper.make_tensor_value_info(down, TensorProto.FLOAT, [qw.in_features, rank]))
        g.inputs.append(helper.make_tensor_value_info(up, TensorProto.FLOAT, [rank, qw.out_features]))
        lora_inputs.append((module, qw.in_features, qw.out_features))
        if st.recovery is not None and module in st.recovery.factors:
            y = g.node("Add", [y, _recovery_term(st, x, module)], f"{module}.recovered")
        delta = g.node("MatMul", [g.node("MatMul", [x, down], f"{module}.lora_h"), up], f"{module}.lora_y")
        return g.node("Add", [y, delta], f"{module}.out")
    return g.node("Gemm", [x, g.init(f"{module}.weight", dense_weights[f"{module}.weight"].astype(np.float32))],
                  f"{module}.y", transB=1)


def _recovery_term(st: ExportState, x: str, module: str) -> str:
    """A recovered base's ``scaling * (x @ A^T) @ B^T`` beside the low-bit op (the merge graph gets the recovered
    weight itself). The factors stay float16, stored transposed (``A_t`` [in, rank], ``B_t`` [rank, out]) under the
    names :data:`RECOVERY_TENSOR` gives, which the manifest locates in weights.bin for the engine's merge decode."""
    g = st.graph
    a, b = st.recovery.factors[module]
    a_t = g.init(RECOVERY_TENSOR.format(module=module, factor="A_t"), np.ascontiguousarray(np.asarray(a).T))
    b_t = g.init(RECOVERY_TENSOR.format(module=module, factor="B_t"), np.ascontiguousarray(np.asarray(b).T))
    h = g.node("MatMul", [x, g.node("Cast", [a_t], to=TensorProto.FLOAT)], f"{module}.recovery_h")
    low = g.node("MatMul", [h, g.node("Cast", [b_t], to=TensorProto.FLOAT)], f"{module}.recovery_low")
    return g.node("Mul", [low, g.const(np.float32(st.recovery.scaling), "recovery_scaling")], f"{module}.recovery_y")


def _dense(st: ExportState, name: str, arr: np.ndarray) -> str:
    g = st.graph
    dtype = np.float16 if st.config.dense_dtype == "float16" else np.float32
    stored = g.init(name, np.asarray(arr).astype(dtype))
    return stored if dtype == np.float32 else g.node("Cast", [stored], name + ".f32", to=TensorProto.FLOAT)


def _rms_norm(st: ExportState, x: str, weight: str, eps: float) -> str:
    g = st.graph
    sq = g.node("Mul", [x, x])
    mean = g.node("ReduceMean", [sq, g.const([-1], dtype=np.int64)], keepdims=1)
    rms = g.node("Sqrt", [g.node("Add", [mean, g.const(np.float32(eps))])])
    return g.node("Mul", [g.node("Div", [x, rms]), weight])


def build_graph(shape: LlamaShape, quantized: Mapping[str, QuantizedWeight], dense: Mapping[str, np.ndarray],
           config: OnnxExportConfig, merge: bool, recovery: Any = None,
           ) -> tuple[onnx.ModelProto, ExportState, list[tuple[str, int, int]]]:
    st = ExportState(config=config, graph=Graph(), merge=merge, recovery=recovery)
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
