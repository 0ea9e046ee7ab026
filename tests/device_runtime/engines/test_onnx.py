"""OnnxEngine refusals that need no exported model (no torch, no sdk): manifest, opset, adapter parameters.

End-to-end engine tests (logits, users, generation) run on an exported tiny Llama in tests/export/onnx/test_onnx.py
and tests/device_runtime/engines/test_conformance.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lowra.device_runtime.engines import onnx as onnx_engine
from lowra.device_runtime.engines.onnx import OnnxEngine, _check_factor_pairs
from lowra.device_runtime.errors import OnnxAdapterError, OnnxModelError
from lowra.device_runtime.formats.onnx_manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    model_version_of,
)

LORA = {
    "m.q": {"down": "lora.m.q.down_t", "up": "lora.m.q.up_t", "in": 8, "out": 4},
    "m.v": {"down": "lora.m.v.down_t", "up": "lora.m.v.up_t", "in": 8, "out": 2},
}


def write_model_dir(root: Path, opset: int = 25, manifest_opset: int | None = None) -> Path:
    """A minimal directory: an Identity graph at ``opset`` and a manifest that declares ``manifest_opset``."""
    root.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["seq"])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), root / "model.onnx")
    (root / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"},
    }))
    manifest = {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "opset": manifest_opset or opset,
        "graphs": {"lowbit": "model.onnx"}, "weights": "weights.bin",
        "model": {"vocab": 2, "layers": 0, "kv_heads": 1, "head_dim": 1, "max_positions": 8},
        "base": {"digests": {}, "shapes": {}}, "model_version": 1, "lora_inputs": LORA,
        "quantized_modules": {}, "merge_weights": [],
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def test_a_minimal_model_dir_loads(tmp_path):
    engine = OnnxEngine(write_model_dir(tmp_path / "m"), threads=1)
    assert engine.logits([1, 0, 1]).tolist() == [1, 0, 1]


def test_missing_or_foreign_manifest(tmp_path):
    with pytest.raises(OnnxModelError, match="does not exist"):
        OnnxEngine(tmp_path / "nowhere")
    root = write_model_dir(tmp_path / "m")
    (root / MANIFEST_NAME).unlink()
    with pytest.raises(OnnxModelError, match="has no lowra_onnx.json"):
        OnnxEngine(root)
    root = write_model_dir(tmp_path / "v")
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    (root / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(OnnxModelError, match="version 99"):
        OnnxEngine(root)


def test_an_opset_the_installed_runtime_lacks_is_refused(tmp_path, monkeypatch):
    # declared in the manifest: refused before ONNX Runtime sees the graph
    monkeypatch.setattr(onnx_engine, "MAX_OPSET_BY_ORT", {onnx_engine._ort_version(): 25})
    with pytest.raises(OnnxModelError, match="needs ONNX opset 26 but the installed onnxruntime"):
        OnnxEngine(write_model_dir(tmp_path / "a", opset=25, manifest_opset=26))
    # a release this table does not know: ONNX Runtime's own refusal is translated
    monkeypatch.setattr(onnx_engine, "MAX_OPSET_BY_ORT", {})
    with pytest.raises(OnnxModelError, match="cannot run this model's opset"):
        OnnxEngine(write_model_dir(tmp_path / "b", opset=30))


def test_adapter_parameters_must_pair_up_with_the_graph_inputs():
    manifest = {"lora_inputs": LORA}
    ok = {"lora.m.q.down_t": (8, 3), "lora.m.q.up_t": (3, 4)}
    _check_factor_pairs(ok, manifest, "adapter")  # a subset of modules is fine
    with pytest.raises(OnnxAdapterError, match="not LoRA inputs of this model"):
        _check_factor_pairs({**ok, "lora.m.k.down_t": (8, 3)}, manifest, "adapter")
    with pytest.raises(OnnxAdapterError, match="has its down factor only; missing parameter 'lora.m.v.up_t'"):
        _check_factor_pairs({**ok, "lora.m.v.down_t": (8, 3)}, manifest, "adapter")
    with pytest.raises(OnnxAdapterError, match=r"expected \[8, r\] and \[r, 4\]"):
        _check_factor_pairs({"lora.m.q.down_t": (8, 3), "lora.m.q.up_t": (2, 4)}, manifest, "adapter")


def test_model_version_is_a_32_bit_hash_of_the_base():
    a = model_version_of({"m.q": "00" * 32}, {"m.q": (4, 8)})
    b = model_version_of({"m.q": "11" * 32}, {"m.q": (4, 8)})
    assert a != b and 0 <= a < 2**31 and 0 <= b < 2**31
    assert a == model_version_of({"m.q": "00" * 32}, {"m.q": [4, 8]})
    assert np.int32(a) == a
