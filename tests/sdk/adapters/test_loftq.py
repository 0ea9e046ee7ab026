"""LoftQ initialization: SVD split, non-increasing residual, beating zero-init, model-level install."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.training.data import load_user_dataset
from lowra.sdk.errors import ConfigError
from lowra.sdk.adapters.loftq import loftq_init, loftq_weight, lowrank_factors
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.model import inject_lora, lora_layers
from lowra.sdk.quant.lowbit_linear import LowBitLinear, replace_linears
from lowra.sdk.quant.baselines import nf_quantize
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.train import evaluate_loss, train_adapter


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def two_bit(w: torch.Tensor) -> QuantizedWeight:
    return nf_quantize(w, 2, 16)


def test_lowrank_factors_are_the_truncated_svd_split_evenly() -> None:
    torch.manual_seed(0)
    m = torch.randn(20, 12) @ torch.diag(torch.linspace(3.0, 0.1, 12)) @ torch.randn(12, 12)
    a, b = lowrank_factors(m, 4)
    assert a.shape == (4, 12) and b.shape == (20, 4)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-4)
    # sqrt(Sigma) on both sides: each factor's column/row norms equal sqrt(sigma_i).
    torch.testing.assert_close(a.norm(dim=1), s[:4].sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(b.norm(dim=0), s[:4].sqrt(), rtol=1e-5, atol=0)
    # A rank above min(out, in) is padded with zero components instead of failing.
    a, b = lowrank_factors(m[:3], 5)
    assert a.shape == (5, 12) and b.shape == (3, 5) and float(a[3:].abs().sum() + b[:, 3:].abs().sum()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [0, 16])
def test_residual_never_increases_and_beats_zero_init(device: str, group_size: int) -> None:
    torch.manual_seed(0)
    # Weights with a few strong directions, like trained ones: the low-rank part of the error is large.
    w = (torch.randn(48, 64) * 0.02 + torch.randn(48, 3) @ torch.randn(3, 64) * 0.05).to(device)
    calls = []

    def quantize(x: torch.Tensor) -> QuantizedWeight:
        calls.append(x.device.type)
        return nf_quantize(x, 2, group_size)

    result = loftq_weight(w, rank=8, scaling=2.0, quantize=quantize, steps=5)
    norms = result.residual_norms
    assert len(norms) == result.steps_run == len(calls) and 2 <= result.steps_run <= 5
    assert all(later <= earlier for earlier, later in zip(norms, norms[1:])), norms
    assert norms[-1] < norms[0]  # the alternation improves on one-shot quantize + SVD
    # Against plain quantization with zero-initialized B: ||W - deq(q(W))||.
    plain = torch.from_numpy(nf_quantize(w, 2, group_size).dequantize()).to(device)
    zero_init = float(torch.linalg.matrix_norm(w - plain))
    assert result.zero_init_norm == pytest.approx(zero_init, rel=1e-6)
    deq = torch.from_numpy(result.quantized.dequantize()).to(device)
    final = float(torch.linalg.matrix_norm(w - deq - 2.0 * result.lora_B @ result.lora_A))
    assert final == pytest.approx(norms[-1], rel=1e-5)
    assert final < 0.8 * zero_init, (final, zero_init)
    assert set(calls) == {device} and result.lora_A.device.type == device


def test_a_step_that_does_not_improve_is_rejected() -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 32) * 0.05
    seen: list[int] = []

    def quantize(x: torch.Tensor) -> QuantizedWeight:
        # The second call quantizes a garbage matrix: its residual is far worse and must not be kept.
        seen.append(len(seen))
        return two_bit(x if len(seen) != 2 else x * 50)

    result = loftq_weight(w, rank=2, scaling=1.0, quantize=quantize, steps=6)
    assert result.steps_run == 2 and len(seen) == 2
    assert result.residual_norms[1] == result.residual_norms[0]
    np.testing.assert_array_equal(result.quantized.codes, two_bit(w).codes)  # the first iterate was kept


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"scaling": 0.0}, "scaling .* must be a finite number > 0"),
        ({"quantize": lambda x: "nope"}, "returned a str; expected a QuantizedWeight"),
        ({"quantize": lambda x: two_bit(x[:, :16])}, r"returned a \[8, 16\] weight for a \[8, 32\] input"),
    ],
)
def test_loftq_weight_refusals(kwargs: dict, match: str) -> None:
    args = {"weight": torch.randn(8, 32), "rank": 2, "scaling": 1.0, "quantize": two_bit, "steps": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        loftq_weight(**args)


def test_loftq_init_installs_quantized_base_and_factors(tiny_model_factory, tiny_tokenizer, tiny_user_dir) -> None:
    lora = LoraConfig(rank=4, alpha=8.0)
    fp_model = tiny_model_factory()
    weights = {n: m.weight.detach().clone() for n, m in fp_model.named_modules() if isinstance(m, nn.Linear)}
    model = tiny_model_factory()
    inject_lora(model, lora)
    paths_seen: list[str] = []

    def quantize_fn(path: str, w: torch.Tensor) -> QuantizedWeight:
        paths_seen.append(path)
        return two_bit(w)

    results = loftq_init(model, None, lora, quantize_fn, steps=3)
    layers = lora_layers(model)
    assert set(results) == set(layers) and len(layers) == 14 and set(paths_seen) == set(layers)
    for path, layer in layers.items():
        assert isinstance(layer.base, LowBitLinear)
        effective = layer.base.dequantize() + layer.delta_weight("default").detach()
        plain = torch.from_numpy(two_bit(weights[path]).dequantize())
        zero_init_error = float(torch.linalg.matrix_norm(weights[path] - plain))
        error = float(torch.linalg.matrix_norm(weights[path] - effective))
        assert error == pytest.approx(results[path].residual_norms[-1], rel=1e-4)
        assert error < zero_init_error, path
    ds = load_user_dataset(tiny_user_dir)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fp_model(input_ids=ids).logits
        loftq_gap = float((model(input_ids=ids).logits - ref).abs().mean())
        # The QLoRA-style start: the same quantizer once, B = 0.
        zero_init = tiny_model_factory()
        inject_lora(zero_init, lora)
        replace_linears(zero_init, {p: two_bit(weights[p]) for p in layers})
        zero_gap = float((zero_init(input_ids=ids).logits - ref).abs().mean())
    assert loftq_gap < zero_gap, (loftq_gap, zero_gap)
    # Training continues from the LoftQ start (the adapter already exists, so it is not re-initialized).
    before = evaluate_loss(model, tiny_tokenizer, ds.heldout, max_len=64)
    config = TrainConfig(steps=15, batch_size=4, learning_rate=1e-2, warmup_steps=2, max_len=64)
    train_adapter(model, tiny_tokenizer, ds, lora, config, progress=False)
    assert evaluate_loss(model, tiny_tokenizer, ds.heldout, max_len=64) < before - 0.2


def test_loftq_init_with_given_weights_over_a_low_bit_base(tiny_model_factory) -> None:
    lora = LoraConfig(rank=2)
    model = tiny_model_factory()
    path = "model.layers.0.mlp.up_proj"
    w = model.get_submodule(path).weight.detach().clone()
    inject_lora(model, lora)
    # Quantize first (plain), then let LoftQ re-quantize that layer from its fp weight.
    loftq_init(model, {path: w}, lora, lambda p, x: two_bit(x), steps=1)
    result = loftq_init(model, {path: w}, lora, lambda p, x: two_bit(x), steps=4)[path]
    assert isinstance(lora_layers(model)[path].base, LowBitLinear)
    assert result.residual_norms[-1] < result.zero_init_norm
    with pytest.raises(ConfigError, match=r"fp_weights\['model.layers.0.mlp.up_proj'\] has shape \[32, 64\]"):
        loftq_init(model, {path: w.T}, lora, lambda p, x: two_bit(x))
    with pytest.raises(ConfigError, match=r"'model.layers.0' is not a LoRA layer"):
        loftq_init(model, {"model.layers.0": w}, lora, lambda p, x: two_bit(x))
    plain = tiny_model_factory()
    with pytest.raises(ConfigError, match=r"call inject_lora\(model, lora, adapter_name\)"):
        loftq_init(plain, None, lora, lambda p, x: two_bit(x))
