"""LowBitLinear and replace_linears: exact decode, gradients, memory accounting, training on a low-bit base."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowra.device_runtime.errors import BlobContentError
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.modules import linear_module_names
from lowra.sdk.training.data import load_user_dataset
from lowra.sdk.errors import ConfigError
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.layer import LoraLinear
from lowra.sdk.adapters.model import inject_lora, lora_layers, set_active_adapters, set_adapter_factors
from lowra.sdk.quant.lowbit_linear import LowBitLinear, lowbit_layers, replace_linears
from lowra.sdk.quant.baselines import nf_quantize
from lowra.sdk.quant.base.fit import quantize_weight
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.train import train_adapter

from tests.conftest import build_tiny_model
from .test_ops import random_weight

MIXED = np.array([1, 2, 4, 2, 2, 1, 4, 2] * 8, dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def _tiny_quantized() -> dict[str, QuantizedWeight]:
    # LowRA's quantizer spends ~1 s per call fitting 4-bit codebooks whatever the size: fit the tiny model once.
    model = build_tiny_model()
    return {
        path: quantize_weight(model.get_submodule(path).weight, MIXED[: model.get_submodule(path).out_features], 16)
        for path in linear_module_names(model)
    }


def tiny_quantized() -> dict[str, QuantizedWeight]:
    """Every adaptable linear of ``build_tiny_model()`` quantized by LowRA's quantizer, 1/2/4-bit rows mixed."""
    return dict(_tiny_quantized())


def dense_copy(model_factory, quantized: dict[str, QuantizedWeight]) -> nn.Module:
    """A plain fp32 model whose linears hold the dequantized weights (the reference for the low-bit model)."""
    model = model_factory()
    with torch.no_grad():
        for path, qw in quantized.items():
            model.get_submodule(path).weight.copy_(torch.from_numpy(qw.dequantize()))
    return model


def test_from_quantized_round_trips_and_holds_only_packed_buffers() -> None:
    qw = random_weight(7, 77, 64, [2, 2, 1, 4, 1, 4, 2])
    layer = LowBitLinear.from_quantized(qw)
    assert (layer.in_features, layer.out_features, layer.group_size) == (77, 7, 64)
    assert list(layer.parameters()) == []
    assert {n: b.dtype for n, b in layer.named_buffers()} == {
        "codes": torch.uint8, "codebooks": torch.float16, "scales": torch.float16, "widths": torch.uint8,
        "row_code_offsets": torch.int64, "row_level_offsets": torch.int64,
    }  # fmt: skip
    back = layer.to_quantized()
    for name in ("widths", "codes", "codebooks", "scales"):
        assert np.array_equal(getattr(back, name), getattr(qw, name)), name
    assert np.array_equal(layer.dequantize().numpy(), qw.dequantize())
    # 2+2+1+4+1+4+2 bits x 77 inputs -> 20+20+10+39+10+39+20 bytes of codes, 48 float16 levels, 7x2 float16
    # scales, 7 widths, 2 x 8 int64 offsets: every byte the layer holds.
    assert layer.nbytes() == 158 + 2 * 48 + 2 * 14 + 7 + 2 * 8 * 8
    assert layer.nbytes() < 7 * 77 * 4 / 2.5


@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_equals_linear_with_dequantized_weight_and_input_gradient(with_bias: bool) -> None:
    qw = random_weight(5, 128, 64, [4, 1, 1, 2, 4])
    torch.manual_seed(1)
    bias = torch.randn(5) if with_bias else None
    layer = LowBitLinear.from_quantized(qw, bias=bias)
    dense = torch.from_numpy(qw.dequantize())
    x = torch.randn(3, 4, 128, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    y, y_dense = layer(x), F.linear(x_dense, dense, bias)
    assert torch.equal(y, y_dense)
    y.square().sum().backward()
    y_dense.square().sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=1e-6, atol=1e-6)


def test_dtype_casts_keep_the_format_and_devices_move_it() -> None:
    qw = random_weight(4, 50, 7, [1, 4, 2, 1])
    layer = LowBitLinear.from_quantized(qw, bias=torch.ones(4))
    layer.to(torch.bfloat16)
    assert layer.codebooks.dtype == torch.float16 and layer.scales.dtype == torch.float16
    assert layer.bias.dtype == torch.bfloat16
    assert np.array_equal(layer.dequantize().numpy(), qw.dequantize())
    layer.to("meta")
    assert layer.codes.device.type == "meta" and layer.codebooks.dtype == torch.float16


def test_state_dict_round_trip_recomputes_offsets() -> None:
    a = LowBitLinear.from_quantized(random_weight(4, 8, 0, [1, 4, 2, 2], seed=1))
    # Same buffer sizes (9 code bytes, 26 levels), different widths per row: only the offsets tell them apart.
    b = LowBitLinear.from_quantized(random_weight(4, 8, 0, [2, 2, 1, 4], seed=2))
    assert "row_code_offsets" not in b.state_dict()
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.row_code_offsets, a.row_code_offsets)
    assert torch.equal(b.dequantize(), a.dequantize())


def test_constructor_refuses_buffers_that_do_not_fit_together() -> None:
    qw = random_weight(4, 50, 7, [1, 4, 2, 1])
    good = {n: torch.from_numpy(getattr(qw, n).copy()) for n in ("codes", "codebooks", "scales", "widths")}
    with pytest.raises(ConfigError, match=r"codes has 51 entries but the widths of its 4 rows imply 52"):
        LowBitLinear(in_features=50, group_size=7, **{**good, "codes": good["codes"][:-1]})
    with pytest.raises(ConfigError, match=r"codebooks has 22 entries but .* imply 24"):
        LowBitLinear(in_features=50, group_size=7, **{**good, "codebooks": torch.zeros(22, dtype=torch.float16)})
    with pytest.raises(ConfigError, match=r"row widths \[3\] are not allowed"):
        LowBitLinear(in_features=50, group_size=7, **{**good, "widths": torch.tensor([1, 3, 2, 1], dtype=torch.uint8)})
    with pytest.raises(ConfigError, match=r"widths are torch.int64"):
        LowBitLinear(in_features=50, group_size=7, **{**good, "widths": good["widths"].long()})
    with pytest.raises(ConfigError, match=r"scales have shape \[4, 8\]; expected \[4, 4\]"):
        LowBitLinear(in_features=50, group_size=16, **good)
    with pytest.raises(ConfigError, match=r"bias has shape \[5\]; expected \[4\]"):
        LowBitLinear.from_quantized(qw, bias=torch.zeros(5))
    bad = copy.deepcopy(qw)
    bad.widths = np.array([1, 4, 2, 3], np.uint8)
    with pytest.raises(BlobContentError, match=r"row widths \[3\] not allowed"):
        LowBitLinear.from_quantized(bad)


def test_replace_linears_gives_the_dequantized_dense_model(tiny_model_factory) -> None:
    model = tiny_model_factory()
    quantized = tiny_quantized()
    fp32_bytes = sum(model.get_submodule(p).weight.nbytes for p in quantized)
    replace_linears(model, quantized)
    dense = dense_copy(tiny_model_factory, quantized)
    assert set(lowbit_layers(model)) == set(quantized) == set(linear_module_names(dense))
    # Only the output head (not adaptable, and tied in most real models) stays a plain Linear.
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["lm_head"]
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=1e-5)
    packed = sum(layer.nbytes() for layer in lowbit_layers(model).values())
    expected = sum(
        q.codes.size + 2 * q.codebooks.size + 2 * q.scales.size + 17 * q.out_features + 16
        for q in quantized.values()
    )
    # 73728 fp32 bytes -> 23072: at in_features=32 the int64 row offsets (16 B/row) are a third of it.
    assert (packed, fp32_bytes) == (expected, 73728) and packed == 23072


def test_replace_linears_after_lora_keeps_adapters(tiny_model_factory) -> None:
    model = tiny_model_factory()
    inject_lora(model, LoraConfig(rank=2))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B["default"])
    quantized = tiny_quantized()
    replace_linears(model, quantized)
    dense = dense_copy(tiny_model_factory, quantized)
    inject_lora(dense, LoraConfig(rank=2))
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    assert all(isinstance(layer.base, LowBitLinear) for layer in lora_layers(model).values())
    assert set(lowbit_layers(model)) == {f"{p}.base" for p in quantized}
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_lora_tools_see_low_bit_linears_as_linears(tiny_model_factory) -> None:
    model = tiny_model_factory()
    paths = linear_module_names(model)
    replace_linears(model, tiny_quantized())
    assert linear_module_names(model) == paths and len(paths) == 14
    path = paths[0]
    a, b = torch.randn(3, 32), torch.randn(32, 3)
    set_adapter_factors(model, "user", {path: (a, b)}, 0.5)
    layer = model.get_submodule(path)
    assert isinstance(layer, LoraLinear) and isinstance(layer.base, LowBitLinear)
    x = torch.randn(2, 32)
    set_active_adapters(model, "user")
    torch.testing.assert_close(layer(x), layer.base(x) + 0.5 * x @ a.T @ b.T, rtol=1e-5, atol=1e-5)


def test_replace_linears_refusals_leave_the_model_untouched(tiny_model_factory) -> None:
    model = tiny_model_factory()
    quantized = tiny_quantized()
    q_path = "model.layers.0.self_attn.q_proj"
    wrong = dict(quantized)
    wrong["model.layers.1.mlp.down_proj"] = quantized[q_path]  # [32, 32] for a [32, 64] layer
    with pytest.raises(ConfigError, match=r"is \[32, 32\] but the layer is \[32, 64\]"):
        replace_linears(model, wrong)
    assert lowbit_layers(model) == {}
    with pytest.raises(ConfigError, match=r"module 'model.layers.9.mlp' does not exist"):
        replace_linears(model, {"model.layers.9.mlp": quantized[q_path]})
    with pytest.raises(ConfigError, match=r"is a LlamaMLP; expected nn.Linear"):
        replace_linears(model, {"model.layers.0.mlp": quantized[q_path]})
    model.lm_head.weight = model.model.embed_tokens.weight
    head = quantize_weight(model.lm_head.weight, 2, 16)
    with pytest.raises(ConfigError, match=r"tied to another module"):
        replace_linears(model, {"lm_head": head})
    assert lowbit_layers(model) == {}


def test_training_on_low_bit_base(tiny_model_factory, tiny_tokenizer, tiny_user_dir) -> None:
    model = tiny_model_factory()
    replace_linears(model, tiny_quantized())
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = load_user_dataset(tiny_user_dir)
    config = TrainConfig(steps=20, batch_size=4, learning_rate=1e-2, warmup_steps=2, max_len=64)
    result = train_adapter(model, tiny_tokenizer, ds, LoraConfig(rank=4), config, progress=False)
    assert sum(result.losses[-4:]) < sum(result.losses[:4]) - 0.5, result.losses
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) and after[k].dtype == base_before[k].dtype for k in after)
    # Gradients reach both factors of every adapter through the low-bit ops (after training B is non-zero,
    # so A gets a gradient too); the base buffers never get one.
    layers = lora_layers(model)
    assert len(layers) == 14 and all(isinstance(layer.base, LowBitLinear) for layer in layers.values())
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids).logits.square().mean().backward()
    for path, layer in layers.items():
        assert float(layer.lora_A["default"].grad.abs().sum()) > 0, path
        assert float(layer.lora_B["default"].grad.abs().sum()) > 0, path
    assert all(b.grad is None for b in model.buffers())


@pytest.mark.slow
def test_smollm2_linears_packed_below_a_tenth_of_fp32() -> None:
    from lowra.sdk.base_model import load_base

    model = load_base().model
    paths = linear_module_names(model)
    fp32 = sum(model.get_submodule(p).weight.nbytes for p in paths)
    replace_linears(model, {p: nf_quantize(model.get_submodule(p).weight, 2, 64) for p in paths})
    packed = sum(layer.nbytes() for layer in lowbit_layers(model).values())
    assert len(paths) == 210 and fp32 == 106_168_320 * 4
    assert packed < fp32 / 10, (packed, fp32)


def _tiny_base_file(model: nn.Module, folder) -> Path:
    """The tiny model quantized to a file, at a budget between its all-1-bit and all-4-bit extremes (its header
    dominates: a few thousand weights)."""
    from lowra.sdk.quant.base.config import QuantizeConfig
    from lowra.sdk.quant.base.plan import plan_model

    plan = plan_model(model, QuantizeConfig(bits=2.0, group_size=16, calibration=None), progress=False)
    low, high = plan.budget_range()
    return plan.quantize(low + 0.4 * (high - low), progress=False).write(folder / "q.safetensors")


def test_load_quantized_base_matches_the_device_decode(tmp_path, tiny_model_factory) -> None:
    """A torch model loaded from a quantized base file computes with exactly what the device runtime decodes."""
    from lowra.device_runtime.runtime import BaseWeights
    from lowra.sdk.quant.lowbit_linear import load_quantized_base
    from lowra.sdk.workflow import model_fingerprint

    source = tiny_model_factory()
    path = _tiny_base_file(source, tmp_path)
    model = tiny_model_factory(seed=1)  # other weights: everything must come from the file
    qb = load_quantized_base(model, path)
    names = linear_module_names(source)
    assert set(lowbit_layers(model)) == set(names)
    decoded = BaseWeights(path).tensors
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if k in decoded}
    for name, layer in lowbit_layers(model).items():
        np.testing.assert_array_equal(layer.dequantize().numpy(), decoded[f"{name}.weight"])
    np.testing.assert_array_equal(state["model.embed_tokens.weight"], decoded["model.embed_tokens.weight"])
    assert model_fingerprint(model, names) == BaseWeights(path).fingerprint(names)
    assert qb.fingerprint and qb.layers.keys() == set(names)


def test_load_quantized_base_refuses_another_architecture(tmp_path, tiny_model_factory) -> None:
    from lowra.sdk.quant.lowbit_linear import load_quantized_base

    path = _tiny_base_file(tiny_model_factory(), tmp_path)
    other = tiny_model_factory()
    other.model.layers[1].mlp.up_proj = nn.Linear(32, 48, bias=False)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ConfigError, match=r"up_proj.*\[64, 32\].*\[48, 32\]"):
        load_quantized_base(other, path)
    assert not lowbit_layers(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
