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
  names, where each module's packed tensors sit in ``weights.bin``, the prompt template).

One graph serves prefill and decode: ``input_ids`` [S] plus ``past_key.<i>``/``past_value.<i>`` [kv_heads, P, D]
(P = 0 for a prefill) give ``logits`` [S, vocab] and ``present_*`` [kv_heads, P + S, D]. Batch size is 1.

CLI: ``python -m lowra.export.onnx --help``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from lowra.device_runtime import formats as fmt
from lowra.device_runtime._files import atomic_dir
from lowra.device_runtime.errors import ConfigError
from lowra.device_runtime.formats.manifest import PROMPT_TEMPLATE_KEY
from lowra.device_runtime.formats.onnx_manifest import (
    LORA_DOWN,
    LORA_UP,
    LOWBIT_GRAPH,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MERGE_GRAPH,
    RECOVERY_TENSOR,
    WEIGHTS_NAME,
    blob_adapter_parameters,
    model_version_of,
    read_manifest,
    write_adapter_file,
)
from lowra.device_runtime.formats.quantized_base import Recovery, recovered_weight
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.export.onnx.config import LOWRA_DOMAIN, MS_DOMAIN, OPSET, OnnxExportConfig
from lowra.export.onnx.decoder import build_graph
from lowra.export.onnx.external_data import ExternalData, tensor_entry
from lowra.export.onnx.graph import ExportState
from lowra.export.onnx.llama import LlamaShape, linear_names
from lowra.export.tokenizer import save_tokenizer

__all__ = ["export_onnx", "size_report", "write_onnx_adapter"]


def _dense_tensors(model: Any) -> dict[str, np.ndarray]:
    """Every non-linear tensor the graph needs, float32 numpy, from a torch model (embeddings, norms, head)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("embed_tokens.weight", "norm.weight", "layernorm.weight")) or name == "lm_head.weight":
            out[name] = tensor.detach().to("cpu").float().numpy()
    return out


def export_onnx(
    model: Any,
    quantized: Mapping[str, QuantizedWeight],
    tokenizer: Any,
    out_dir: str | Path,
    config: OnnxExportConfig | None = None,
    overwrite: bool = False,
    recovery: Recovery | None = None,
) -> dict[str, Any]:
    """Write the ONNX model directory for ``model`` (a transformers Llama-family causal LM, fp32) whose linear
    layers named in ``quantized`` use the low-bit base. Modules not in ``quantized`` stay float32 (with an empty
    ``quantized`` this is the fp32 ONNX of the model). Dense tensors are taken from ``model``. Returns the manifest.

    The directory is built in a sibling temp folder and renamed into place (``atomic_dir``), so a crash never
    leaves a half written model under ``out_dir``; an existing non-empty ``out_dir`` needs ``overwrite``.

    ``recovery`` (a version-2 base's accuracy-recovery adapter, ``QuantizedBase.recovery``) is part of the base: the
    low-bit graph adds its low-rank term beside each low-bit op, the merge graph receives the recovered weights, and
    the digests blobs bind to are those of the recovered weights (``recovered_weight``).
    """
    config = config or OnnxExportConfig()
    shape = LlamaShape.from_config(model.config)
    for m in quantized:
        if not any(m in linear_names(i) for i in range(shape.layers)):
            raise ConfigError(f"quantized module {m!r} is not a decoder linear of this model")
    dense = _dense_tensors(model)
    for m in (n for i in range(shape.layers) for n in linear_names(i)):
        if m not in quantized:
            dense[f"{m}.weight"] = model.get_submodule(m).weight.detach().float().numpy()
    if config.dense_dtype == "float16":
        dense = {k: (v.astype(np.float16).astype(np.float32) if not k.endswith("_proj.weight") else v) for k, v in dense.items()}
    max_positions = min(config.max_positions or shape.max_positions, shape.max_positions)

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if recovery is not None and not set(recovery.factors) <= set(quantized):
            raise ConfigError("the recovery adapter covers modules that are not quantized linears of this export")
        lowbit, st, lora_inputs = build_graph(shape, quantized, dense, config, merge=False, recovery=recovery)
        merged = build_graph(shape, quantized, dense, config, merge=True)[0] if quantized else None
        data = ExternalData(tmp / WEIGHTS_NAME)
        data.externalize(lowbit)
        if merged is not None:
            data.externalize(merged)
        data.add_side(st.graph.side)
        data.close()
        onnx.save_model(lowbit, tmp / LOWBIT_GRAPH)
        if merged is not None:
            onnx.save_model(merged, tmp / MERGE_GRAPH)
        template = save_tokenizer(tokenizer, tmp)
        digests = {m: fmt.tensor_digest(_base_weight(qw, m, recovery)) for m, qw in quantized.items()}
        for i in range(shape.layers):
            for m in linear_names(i):
                if m not in quantized:
                    digests[m] = fmt.tensor_digest(dense[f"{m}.weight"])
        shapes = {m: [int(quantized[m].out_features), int(quantized[m].in_features)] if m in quantized
                  else list(dense[f"{m}.weight"].shape) for m in digests}
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "opset": OPSET,
            "domains": {LOWRA_DOMAIN: 1, **({MS_DOMAIN: 1} if st.matmulnbits_groups else {})},
            "graphs": {"lowbit": LOWBIT_GRAPH, **({"merge": MERGE_GRAPH} if merged is not None else {})},
            "weights": WEIGHTS_NAME,
            "model": {"vocab": shape.vocab, "layers": shape.layers, "kv_heads": shape.kv_heads,
                      "head_dim": shape.head_dim, "max_positions": max_positions},
            "base": {"digests": digests, "shapes": shapes},
            "model_version": model_version_of(digests, shapes),
            "lora_inputs": {m: {"down": LORA_DOWN.format(module=m), "up": LORA_UP.format(module=m), "in": i, "out": o}
                            for m, i, o in lora_inputs},
            "quantized_modules": _quantized_modules(st, data, lowbit),
            "merge_weights": sorted(f"{m}.weight" for m in quantized),
            "counts": {"function_groups": st.function_groups, "matmulnbits_groups": st.matmulnbits_groups},
            "dense_dtype": config.dense_dtype,
            PROMPT_TEMPLATE_KEY: template,
        }
        if recovery is not None:
            manifest["recovery"] = {
                "rank": int(recovery.rank), "scaling": float(recovery.scaling),
                "modules": {m: {f: tensor_entry(lowbit, RECOVERY_TENSOR.format(module=m, factor=f))
                                for f in ("A_t", "B_t")} for m in sorted(recovery.factors)},
            }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _base_weight(qw: QuantizedWeight, module: str, recovery: Recovery | None) -> np.ndarray:
    """The float32 weight a blob binds to: the decode, plus the recovery adapter's term where it has one."""
    weight = qw.dequantize()
    if recovery is None or module not in recovery.factors:
        return weight
    a, b = recovery.factors[module]
    return recovered_weight(weight, a, b, recovery.scaling)


def _quantized_modules(st: ExportState, data: ExternalData, lowbit: onnx.ModelProto) -> dict[str, Any]:
    """The manifest's ``quantized_modules``: where each width group's tensors landed in weights.bin."""
    modules = {}
    for m, rec in st.module_tensors.items():
        groups = []
        for gr in rec["groups"]:
            rows = st.graph.side[gr["rows"]]
            offset, length = data.entries[gr["rows"]]
            entry = {"width": gr["width"], "rows": {"offset": offset, "length": length, "dtype": "int32",
                                                    "shape": list(rows.shape)}}
            entry.update({k: tensor_entry(lowbit, gr[k]) for k in ("codes", "codebooks", "scales") if k in gr})
            groups.append(entry)
        modules[m] = {"out": rec["out"], "in": rec["in"], "group_size": rec["group_size"], "groups": groups}
    return modules


def size_report(model_dir: str | Path, packed_payload_bytes: int | None = None) -> dict[str, int | float]:
    """Bytes of each file of a model directory (and the ratio to a packed payload, e.g. the lowra base file)."""
    d = Path(model_dir)
    report: dict[str, int | float] = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
    report["lowbit_graph_total"] = report.get(LOWBIT_GRAPH, 0) + report.get(WEIGHTS_NAME, 0)
    if packed_payload_bytes:
        report["packed_payload"] = int(packed_payload_bytes)
        report["ratio_to_packed"] = report["lowbit_graph_total"] / packed_payload_bytes
    return report


def write_onnx_adapter(model_dir: str | Path, blob: str | Path | fmt.Blob, out_path: str | Path) -> Path:
    """Convert a lowra blob into an ``.onnx_adapter`` for the model at ``model_dir``, checked against its base first.

    The adapter's model version binds it to this base (``model_version_of``). Written atomically (replacing
    ``out_path``).
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    parsed = blob if isinstance(blob, fmt.Blob) else fmt.read_blob(blob)
    fmt.check_base_binding(parsed, manifest["base"]["digests"], manifest["base"]["shapes"],
                           f"the ONNX model at {model_dir}")
    params = blob_adapter_parameters(parsed, manifest)
    return write_adapter_file(params, int(manifest["model_version"]), out_path)
