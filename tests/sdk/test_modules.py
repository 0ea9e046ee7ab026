"""Target selection and the "is a linear" registry shared by LoRA, low-bit layers and quantization."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.model import inject_lora
from lowra.sdk.errors import ConfigError
from lowra.sdk.modules import adaptable_linears, is_linear, is_linear_wrapper, linear_module_names, register_linear
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.fit import quantize_weight
from lowra.sdk.quant.lowbit_linear import replace_linears


def test_linear_module_names_order_and_targets(tiny_model) -> None:
    names = linear_module_names(tiny_model)
    assert names[:3] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert len(names) == 14 and "lm_head" not in names
    assert linear_module_names(tiny_model, ["down_proj"]) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(ConfigError) as err:
        linear_module_names(tiny_model, ["lm_head", "q_proj"])
    assert "lm_head" in str(err.value) and "up_proj" in str(err.value)
    with pytest.raises(ConfigError):
        linear_module_names(tiny_model, "some-linear")


def test_wrapped_and_low_bit_linears_are_still_targets(tiny_model) -> None:
    names = linear_module_names(tiny_model)
    inject_lora(tiny_model, LoraConfig(rank=2, targets=["q_proj"]))
    path = "model.layers.0.mlp.up_proj"
    weight = tiny_model.get_submodule(path).weight
    replace_linears(tiny_model, {path: quantize_weight(weight, 2)})
    assert linear_module_names(tiny_model) == names  # a LoraLinear counts as its linear, a LowBitLinear as one
    kinds = dict(adaptable_linears(tiny_model))
    assert is_linear_wrapper(kinds["model.layers.0.self_attn.q_proj"])
    assert is_linear(kinds[path]) and not is_linear_wrapper(kinds[path])


def test_registered_layer_counts_as_a_linear() -> None:
    @register_linear
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features = 4, 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., :3]

    model = nn.Sequential(nn.Linear(4, 4), Packed(), nn.ReLU())
    assert linear_module_names(model) == ["0", "1"]
    assert not is_linear(model[2])


@pytest.mark.parametrize("targets", ["some-linear", [], [""], ["q_proj", 3], None])
def test_one_targets_check_for_every_config(tiny_model, targets) -> None:
    for make in (lambda: LoraConfig(targets=targets), lambda: QuantizeConfig(targets=targets),
                 lambda: linear_module_names(tiny_model, targets)):
        with pytest.raises(ConfigError, match="all-linear"):
            make()
