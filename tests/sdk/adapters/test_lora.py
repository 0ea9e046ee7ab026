from __future__ import annotations

import pytest
import torch
from torch import nn

from lowra.sdk.errors import ConfigError
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.layer import LoraLinear
from lowra.sdk.adapters.model import delete_adapter, get_adapter_factors, inject_lora, lora_layers, set_active_adapters, set_adapter_factors
from lowra.sdk.adapters.input_stats import input_stats, recording_input_stats, set_stats_token_mask


def _ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (batch, length), generator=g)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize_b(model: nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 0}, {"rank": 2.5}, {"alpha": 0}, {"alpha": -1.0}, {"dropout": 1.0}, {"dropout": -0.1},
     {"targets": "everything"}, {"targets": []}],
)
def test_lora_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        LoraConfig(**kwargs)


def test_lora_config_scaling_and_round_trip() -> None:
    cfg = LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"], dropout=0.1)
    assert cfg.scaling == 2.0
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown LoraConfig keys"):
        LoraConfig.from_dict({"rank": 4, "bogus": 1})


def test_zero_b_equals_base_exactly() -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    layer = LoraLinear(base)
    layer.add_adapter("a", rank=4, scaling=2.0)
    layer.active = ["a"]
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A["a"].shape == (4, 24) and layer.lora_B["a"].shape == (20, 4)
    assert layer.in_features == 24 and layer.out_features == 20


def test_delta_weight_matches_merged_linear() -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    layer = LoraLinear(base)
    layer.add_adapter("a", rank=4, scaling=1.5)
    layer.active = ["a"]
    with torch.no_grad():
        # Keep outputs O(1) so float32 rounding stays well under the 1e-6 bound.
        layer.lora_B["a"].normal_(std=0.05)
    merged = nn.Linear(24, 20)
    with torch.no_grad():
        merged.weight.copy_(base.weight + layer.delta_weight("a"))
        merged.bias.copy_(base.bias)
    x = torch.randn(4, 24)
    torch.testing.assert_close(layer(x), merged(x), atol=1e-6, rtol=0)
    assert not torch.equal(layer(x), base(x))


def test_inject_all_linear_excludes_lm_head(tiny_model: nn.Module) -> None:
    paths = inject_lora(tiny_model, LoraConfig(rank=4))
    assert len(paths) == 14
    assert "model.layers.0.self_attn.q_proj" in paths
    assert not any("lm_head" in p for p in paths)
    assert isinstance(tiny_model.lm_head, nn.Linear) and not isinstance(tiny_model.lm_head, LoraLinear)
    assert list(lora_layers(tiny_model)) == paths
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_named_targets_and_unknown_target(tiny_model: nn.Module) -> None:
    paths = inject_lora(tiny_model, LoraConfig(rank=2, targets=["q_proj", "v_proj"]))
    assert paths == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(ConfigError) as err:
        inject_lora(tiny_model, LoraConfig(rank=2, targets=["qkv_proj"]), "other")
    assert "qkv_proj" in str(err.value) and "down_proj" in str(err.value)


def test_injected_model_matches_base_until_trained(tiny_model: nn.Module, tiny_model_factory) -> None:
    ids = _ids()
    reference = _logits(tiny_model_factory(), ids)
    inject_lora(tiny_model, LoraConfig(rank=4))
    assert torch.equal(_logits(tiny_model, ids), reference)


def test_two_adapters_coexist_and_switch_exactly(tiny_model: nn.Module) -> None:
    ids = _ids()
    base_out = _logits(tiny_model, ids)
    inject_lora(tiny_model, LoraConfig(rank=4), "alice")
    inject_lora(tiny_model, LoraConfig(rank=2, alpha=4), "bob")
    _randomize_b(tiny_model, "alice", 1)
    _randomize_b(tiny_model, "bob", 2)
    # The first adapter is active after injection; later ones are added inactive.
    alice_out = _logits(tiny_model, ids)
    assert not torch.equal(alice_out, base_out)
    set_active_adapters(tiny_model, "bob")
    bob_out = _logits(tiny_model, ids)
    assert not torch.equal(bob_out, alice_out)
    set_active_adapters(tiny_model, None)
    assert torch.equal(_logits(tiny_model, ids), base_out)
    set_active_adapters(tiny_model, ["alice"])
    assert torch.equal(_logits(tiny_model, ids), alice_out)
    set_active_adapters(tiny_model, ["alice", "bob"])
    both = _logits(tiny_model, ids)
    assert not torch.equal(both, alice_out) and not torch.equal(both, bob_out)
    with pytest.raises(ConfigError, match="carol"):
        set_active_adapters(tiny_model, ["carol"])
    with pytest.raises(ConfigError, match="already exists"):
        inject_lora(tiny_model, LoraConfig(rank=4), "alice")
    for bad in ("", "a.b", "keys", "copy"):
        with pytest.raises(ConfigError):
            inject_lora(tiny_model, LoraConfig(rank=4), bad)


def test_get_set_factors_round_trip_and_shape_errors(tiny_model: nn.Module, tiny_model_factory) -> None:
    ids = _ids()
    inject_lora(tiny_model, LoraConfig(rank=4, alpha=8))
    _randomize_b(tiny_model, "default", 3)
    factors = get_adapter_factors(tiny_model, "default")
    out = _logits(tiny_model, ids)

    other = tiny_model_factory()
    set_adapter_factors(other, "copied", factors, scaling=2.0)
    set_active_adapters(other, "copied")
    assert torch.equal(_logits(other, ids), out)

    path = "model.layers.0.mlp.down_proj"
    a, b = factors[path]
    with pytest.raises(ConfigError) as err:
        set_adapter_factors(other, "bad", {path: (a, b[:-1])}, scaling=1.0)
    assert path in str(err.value) and "expected" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        set_adapter_factors(other, "bad", {"model.nope": (a, b)}, scaling=1.0)
    assert "bad" not in lora_layers(other)[path].lora_A


def test_delete_adapter_restores_base(tiny_model: nn.Module) -> None:
    ids = _ids()
    base_out = _logits(tiny_model, ids)
    inject_lora(tiny_model, LoraConfig(rank=4), "a")
    inject_lora(tiny_model, LoraConfig(rank=4, targets=["q_proj"]), "b")
    _randomize_b(tiny_model, "a", 1)
    set_active_adapters(tiny_model, ["a", "b"])
    delete_adapter(tiny_model, "a")
    # Layers that only held "a" are unwrapped back to plain linears.
    assert set(lora_layers(tiny_model)) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert all(layer.active == ["b"] for layer in lora_layers(tiny_model).values())
    delete_adapter(tiny_model, "b")
    assert lora_layers(tiny_model) == {}
    assert torch.equal(_logits(tiny_model, ids), base_out)
    with pytest.raises(ConfigError):
        delete_adapter(tiny_model, "b")


def test_input_stats_mean_square() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    inject_lora(model, LoraConfig(rank=2), "a")
    layer = lora_layers(model)["0"]
    x1, x2 = torch.randn(3, 4, 6), torch.randn(7, 6)
    model(x1)
    assert layer.input_sq_sum is None and input_stats(model) == {}
    with recording_input_stats(model):
        model(x1)
        model(x2)
    assert not layer.record_input_stats
    allx = torch.cat([x1.reshape(-1, 6), x2])
    stats = input_stats(model)
    assert layer.input_count == 19
    assert stats["0"].dtype == torch.float32
    torch.testing.assert_close(stats["0"], allx.pow(2).mean(0), atol=1e-6, rtol=1e-6)
    # Statistics are not part of the state dict (they are not weights).
    assert not any("input" in k for k in model.state_dict())


def test_input_stats_skip_masked_tokens() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    inject_lora(model, LoraConfig(rank=2), "a")
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with recording_input_stats(model):
        set_stats_token_mask(model, mask)
        model(x)
    kept = x[mask.bool()]
    assert lora_layers(model)["0"].input_count == 5
    torch.testing.assert_close(input_stats(model)["0"], kept.pow(2).mean(0), atol=1e-6, rtol=1e-6)
    assert lora_layers(model)["0"].stats_token_mask is None
