"""Shared, cached ExecuTorch artifacts for the export and engine tests (tiny Llama, two users).

Exports cost ~15-40 s each on 2 shared cores (torch.export + edge lowering of a dynamic-length KV-cache program),
so every folder is built once per test process (``functools.cache``) and reused by tests/export and
tests/device_runtime. Nothing here is a test; the checks on the artifacts themselves are at the bottom.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

executorch_missing = importlib.util.find_spec("executorch") is None or shutil.which("g++") is None
requires_executorch = pytest.mark.skipif(executorch_missing, reason="needs the executorch wheel and g++")

MAX_SEQ_LEN = 32
RANK = 4
GROUP_SIZE = 24  # in_features 32/64: one full group and a partial one per row
_ROOT = Path(tempfile.mkdtemp(prefix="lowra-et-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


def mixed_widths(out_features: int, seed: int) -> np.ndarray:
    """Rows of width 1, 2 and 4 in a scrambled order (exercises per-row offsets and the row permutation)."""
    widths = np.array([1, 2, 4], dtype=np.uint8)[np.arange(out_features) % 3]
    return np.random.default_rng(seed).permutation(widths)


def tiny_llama(seed: int = 0):
    """The conftest tiny Llama cut to one decoder layer.

    The export cost grows with the graph (~15 s per layer and program on 2 shared cores), and one layer already
    has every kind of linear, the KV cache and the head.
    """
    from tests.conftest import build_tiny_model

    model = build_tiny_model(seed)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    return model


@functools.cache
def lowbit_tiny():
    """(low-bit tiny Llama, {module: QuantizedWeight}) with mixed widths and group scales in every linear."""
    import torch

    from lowra.sdk.modules import linear_module_names
    from lowra.sdk.quant.lowbit_linear import replace_linears
    from lowra.sdk.quant.base.fit import quantize_weight
    model = tiny_llama()
    layers = {}
    for i, name in enumerate(linear_module_names(model)):
        weight = model.get_submodule(name).weight.detach()
        layers[name] = quantize_weight(weight, mixed_widths(weight.shape[0], i), group_size=GROUP_SIZE, name=name)
    replace_linears(model, layers)
    with torch.no_grad():  # float16 values, as a base file stores dense tensors: the programs keep them in float16
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.weight.copy_(module.weight.half().float())
    torch.manual_seed(0)
    return model, layers


@functools.cache
def user_blobs() -> tuple[Path, Path]:
    """Two users' blobs for the tiny low-bit base: random rank-4 LoRA on every linear, 1.5-bit compressed."""
    import torch

    from lowra.sdk.modules import linear_module_names
    from lowra.sdk.quant.config import CompressConfig
    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.workflow import compress_factors, model_fingerprint

    model, _ = lowbit_tiny()
    names = linear_module_names(model)
    fingerprint = model_fingerprint(model, names)
    lora = LoraConfig(rank=RANK, alpha=8.0)
    paths = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        factors = {}
        for name in names:
            layer = model.get_submodule(name)
            a = torch.randn(RANK, layer.in_features, generator=g) * 0.3
            b = torch.randn(layer.out_features, RANK, generator=g) * 0.3
            factors[name] = (a, b)
        adapter = compress_factors(factors, lora, CompressConfig(bits=8.0, weighted=False),
                                   adapter_id=f"user{seed}", base_fingerprint=fingerprint)
        path = _ROOT / f"user{seed}.lowra"
        adapter.write(path, overwrite=True)
        paths.append(path)
    return paths[0], paths[1]


@functools.cache
def exported(ops: str = "custom", modes: tuple[str, ...] = ("side", "merge"), xnnpack: bool = False,
             embeddings: str = "auto", side_factors: str = "packed4") -> Path:
    """An exported model folder of the tiny low-bit model (cached per argument set).

    XNNPACK is off here to keep the suite fast (delegation adds a re-export and ~2x the lowering time); the
    bench exports SmolLM2 with XNNPACK and checks the same equalities there.
    """
    from lowra.export.executorch import ExecutorchExportConfig, export_executorch
    from tests.conftest import _build_tokenizer

    model, _ = lowbit_tiny()
    folder = _ROOT / f"{ops}-{'-'.join(modes)}-{'xnn' if xnnpack else 'portable'}-{embeddings}-{side_factors}"
    # The core-ATen folder keeps every position's logits, so both program outputs stay covered by the engine tests.
    config = ExecutorchExportConfig(ops=ops, modes=modes, max_seq_len=MAX_SEQ_LEN, rank=RANK, xnnpack=xnnpack,
                                    logits="all" if ops == "aten" else "last", embeddings=embeddings,
                                    side_factors=side_factors)
    export_executorch(model, folder, config, tokenizer=_build_tokenizer())
    return folder


def copy_folder(folder: Path, name: str) -> Path:
    """A private copy to damage in a test (the cached folder stays intact)."""
    target = _ROOT / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    return target


# ------------------------------------------------------------------------------------------------ checks
@requires_executorch
def test_program_holds_packed_codes_not_fp32_weights_and_user_data_is_separate():
    """The side program keeps each linear as its packed codes (no fp32 refolding); the .ptd holds only the user
    factors; the merge program's data holds the dense adapted weights."""
    import json

    folder = exported()
    manifest = json.loads((folder / "manifest.json").read_text())
    model, layers = lowbit_tiny()
    pte = (folder / "side.pte").read_bytes()
    from lowra.device_runtime.formats.quantized_weight import kernel_blocked_codes

    for name, qw in layers.items():
        # the packed codes, in the kernels' BLOCKED layout (the file's bytes in the order the kernels read them)
        assert kernel_blocked_codes(qw.codes, qw.widths, qw.in_features).tobytes() in pte, name
        assert qw.dequantize()[0].tobytes() not in pte, name  # no decoded float32 row anywhere
    side, merge = manifest["programs"]["side"], manifest["programs"]["merge"]
    # the factors as 4-bit codes (half a byte per value) and 16 float16 levels per channel, plus segment alignment
    n_packed = sum(RANK * (-(-w.in_features // 2) + -(-w.out_features // 2) + 2 * 16 * 2) for w in layers.values())
    assert n_packed <= side["data_bytes"] < n_packed + 128 * 4 * len(layers) + 8192
    roles = ("down_codes", "down_books", "up_codes", "up_books")
    assert set(side["tensors"]) == {f"{m}:{r}" for m in layers for r in roles}
    assert {entry["dtype"] for entry in side["tensors"].values()} == {"uint8", "float16"}
    assert {entry["dtype"] for entry in merge["tensors"].values()} == {"float32"}
    fp32_linears = sum(w.out_features * w.in_features * 4 for w in layers.values())
    assert merge["data_bytes"] >= fp32_linears  # merge at load keeps the adapted weights dense
    assert manifest["packed_base_bytes"]["codes"] == sum(w.codes.size for w in layers.values())


def _operator_calls(pte: Path) -> dict[str, int]:
    """How many instructions of the program's method call each operator (from the serialized program)."""
    from collections import Counter

    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    plan = getattr(program, "program", program).execution_plan[0]
    names = [op.name + (f".{op.overload}" if op.overload else "") for op in plan.operators]
    return Counter(names[ins.instr_args.op_index] for chain in plan.chains for ins in chain.instructions
                   if hasattr(ins.instr_args, "op_index"))


def test_each_layer_is_one_op_call_and_no_weight_is_copied_transposed():
    """What a decode step calls, per program. Side: each adaptable linear is one lowra::lowbit_linear_blocked_lora4
    call (the packed codes read in place plus the user's side branch, its factors as 4-bit codes). Merge: aten.linear kept whole on the merged weights
    (decomposed, every call copied W^T first: ETDump on SmolLM2 put half of a decode step in permute_copy). Both: the
    float16 head in lowra::f16_linear and attention in one lowra::attention per layer (no matmuls over a transposed
    key cache, no separate softmax), the new keys and values written into the cache in place. The permute_copy calls left are the q/k/v head transposes, as many in both."""
    folder = exported()
    _, layers = lowbit_tiny()
    side, merge = _operator_calls(folder / "side.pte"), _operator_calls(folder / "merge.pte")
    assert side["lowra::lowbit_linear_blocked_lora4.out"] == len(layers)
    assert side["lowra::lowbit_linear_blocked_lora.out"] == 0
    assert side["lowra::lowbit_linear.out"] == side["lowra::lowbit_linear_blocked.out"] == side["aten::linear.out"] == 0
    assert side["lowra::lowbit_linear_planar.out"] == side["lowra::lowbit_linear_planar_lora.out"] == 0
    assert merge["aten::linear.out"] == len(layers)  # every merged weight
    assert side["lowra::f16_linear.out"] == merge["lowra::f16_linear.out"] == 1  # the float16 head
    assert side["aten::permute_copy.out"] == merge["aten::permute_copy.out"]
    n_layers = len(lowbit_tiny()[0].model.layers)
    assert side["lowra::attention.out"] == merge["lowra::attention.out"] == n_layers
    assert side["aten::bmm.out"] == 0 and side["aten::_softmax.out"] == 0
    # Each RMSNorm is one lowra::rms_norm call (two per layer and the final one), not pow/mean/rsqrt/mul kernels.
    assert side["lowra::rms_norm.out"] == merge["lowra::rms_norm.out"] == 2 * n_layers + 1
    assert side["aten::pow.Tensor_Scalar_out"] == side["aten::rsqrt.out"] == 0
    # The KV cache is written in place (reinplace pass): no functional index_put copying a layer's cache per step.
    assert side["aten::index_put_"] == merge["aten::index_put_"] == 2 * n_layers
    assert side["aten::index_put.out"] == merge["aten::index_put.out"] == 0


def test_embedding_and_head_are_stored_once_in_float16():
    """A model whose embedding/head values are float16 (as loaded from a base file) keeps them in float16: the
    programs hold those bytes and no float32 copy of them, and the manifest says so."""
    import json

    import torch

    folder = exported()
    model, _ = lowbit_tiny()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["embeddings"] == "float16" and manifest["logits"] == "last"
    for mode in ("side", "merge"):
        pte = (folder / f"{mode}.pte").read_bytes()
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            weight = module.weight.detach()
            assert weight.to(torch.float16).numpy().tobytes() in pte, mode
            assert weight[:4].float().numpy().tobytes() not in pte, mode


@requires_executorch
def test_embeddings_choice_is_checked_and_auto_keeps_float32_when_rounding_would_change_the_model():
    import warnings

    from lowra.export.executorch import ExecutorchExportConfig
    from lowra.export.executorch.exporter import embedding_dtype

    with pytest.raises(Exception, match="embeddings='float16' needs ops='custom'"):
        ExecutorchExportConfig(ops="aten", embeddings="float16")
    with pytest.raises(Exception, match="expected 'auto' or one of"):
        ExecutorchExportConfig(embeddings="int4")
    with pytest.raises(Exception, match="embeddings='int8' needs ops='custom'"):
        ExecutorchExportConfig(ops="aten", embeddings="int8")
    with pytest.raises(Exception, match=r"side_factors='bfloat16'; expected one of \('float16', 'float32', 'packed4'\)"):
        ExecutorchExportConfig(side_factors="bfloat16")
    assert embedding_dtype(lowbit_tiny()[0], ExecutorchExportConfig(ops="aten")) == "float32"
    with pytest.warns(UserWarning, match="not float16, so the programs keep them in float32"):
        assert embedding_dtype(tiny_llama(), ExecutorchExportConfig()) == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert embedding_dtype(tiny_llama(), ExecutorchExportConfig(embeddings="float16")) == "float16"


@requires_executorch
def test_manifest_lists_the_kernel_ops_the_programs_call():
    """kernel_ops is exactly the lowra:: operators of the programs (what the engine requires of the library); a
    folder without the list is an older one, which calls the first two only; a list with unknown ops is refused."""
    import json

    from lowra.device_runtime.errors import ProgramError
    from lowra.device_runtime.formats.executorch_manifest import LEGACY_KERNEL_OPS, Manifest

    folder = exported()
    called = set()
    for mode in ("side", "merge"):
        called |= {op for op in _operator_calls(folder / f"{mode}.pte") if op.startswith("lowra::")}
    assert Manifest.read(folder).kernel_ops == tuple(sorted(called))
    assert "lowra::attention.out" in called and "lowra::lowbit_linear.out" not in called
    assert Manifest.read(exported("aten", ("side",), False)).kernel_ops == ()
    old = copy_folder(folder, "manifest-without-kernel-ops")
    data = json.loads((old / "manifest.json").read_text())
    del data["kernel_ops"]
    (old / "manifest.json").write_text(json.dumps(data))
    assert Manifest.read(old).kernel_ops == LEGACY_KERNEL_OPS
    data["kernel_ops"] = ["lowra::from_the_future.out"]
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ProgramError, match="a folder from a newer lowra"):
        Manifest.read(old).kernel_ops
