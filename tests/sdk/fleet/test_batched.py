"""Grouped LoRA layers: each row gets its own user's delta, blocks round-trip, the model's layers come back."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.layer import LoraLinear
from lowra.sdk.adapters.model import inject_lora, lora_layers
from lowra.sdk.errors import ConfigError
from lowra.sdk.fleet.batched import GroupedLoraLinear, RowGroups, grouped_lora


def _layer_with_users(users: list[str], seed: int = 0) -> LoraLinear:
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(6, 5))
    for u in users:
        layer.add_adapter(u, rank=3, scaling=2.0)
        nn.init.normal_(layer.lora_B[u])  # B starts at zero; make every user's delta visible
    return layer


@pytest.mark.parametrize("counts", [(2, 2, 2), (2, 1, 3)])
def test_blocks_round_trip(counts: tuple[int, ...]) -> None:
    rows = sum(counts)
    groups = RowGroups.build(["a", "b", "c"], counts, torch.ones(rows, 4, dtype=torch.long))
    x = torch.randn(rows, 4, 6)
    blocks = groups.to_blocks(x)
    assert blocks.shape == (3, max(counts) * 4, 6)
    # Each block starts with its user's rows, in order; padding rows are zeros.
    start = 0
    for i, count in enumerate(counts):
        assert torch.equal(blocks[i, : count * 4], x[start : start + count].reshape(-1, 6))
        assert not blocks[i, count * 4 :].any()
        start += count
    assert torch.equal(groups.from_blocks(blocks, x), x)


@pytest.mark.parametrize("counts", [(2, 2, 2), (1, 3, 2)])
def test_each_row_gets_its_own_users_delta(counts: tuple[int, ...]) -> None:
    users = ["a", "b", "c"]
    layer = _layer_with_users(users)
    rows = sum(counts)
    mask = torch.ones(rows, 4, dtype=torch.long)
    mask[0, 3] = 0  # a padding token: it must not count for statistics
    x = torch.randn(rows, 4, 6)
    order = ["c", "a", "b"]  # any subset and order of the group's users may be routed
    with grouped_lora(nn.Sequential(layer), users) as group:
        group.route(RowGroups.build(order, counts, mask))
        grouped = group.layers["0"]
        assert isinstance(grouped, GroupedLoraLinear)
        grouped.record_input_stats = True
        out = grouped(x)
        stats = {u: group.input_stats(u) for u in users}
    start = 0
    for user, count in zip(order, counts):
        layer.active = [user]
        rows_x = x[start : start + count]
        torch.testing.assert_close(out[start : start + count], layer(rows_x), rtol=1e-6, atol=1e-6)
        real = rows_x.reshape(-1, 6)[mask[start : start + count].reshape(-1).bool()]
        torch.testing.assert_close(stats[user]["0"], real.pow(2).mean(dim=0), rtol=1e-6, atol=1e-7)
        start += count


def test_gradients_stay_with_their_user() -> None:
    users = ["a", "b"]
    layer = _layer_with_users(users)
    x = torch.randn(3, 4, 6)
    with grouped_lora(nn.Sequential(layer), users) as group:
        group.route(RowGroups.build(["a", "b"], [1, 2], torch.ones(3, 4, dtype=torch.long)))
        out = group.layers["0"](x)
    out[:1].sum().backward()  # only user a's rows feed the loss
    assert layer.lora_A["a"].grad.abs().sum() > 0 and layer.lora_B["a"].grad.abs().sum() > 0
    assert not layer.lora_A["b"].grad.any() and not layer.lora_B["b"].grad.any()


def test_layers_come_back_even_after_an_error(tiny_model) -> None:
    for u in ("a", "b"):
        inject_lora(tiny_model, LoraConfig(rank=2), u)
    before = lora_layers(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with grouped_lora(tiny_model, ["a", "b"]) as group:
            assert group.layers.keys() == before.keys()
            assert all(isinstance(tiny_model.get_submodule(path), GroupedLoraLinear) for path in before)
            raise RuntimeError("boom")
    after = lora_layers(tiny_model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_refusals(tiny_model) -> None:
    with pytest.raises(ConfigError, match="inject them first"):
        with grouped_lora(tiny_model, ["a"]):
            pass
    inject_lora(tiny_model, LoraConfig(rank=2), "a")
    inject_lora(tiny_model, LoraConfig(rank=3), "b")
    with pytest.raises(ConfigError, match="one rank and one scaling"):
        with grouped_lora(tiny_model, ["a", "b"]):
            pass
    with pytest.raises(ConfigError, match="distinct"):
        with grouped_lora(tiny_model, ["a", "a"]):
            pass
    with grouped_lora(tiny_model, ["a"]) as group:
        with pytest.raises(ConfigError, match="RowGroups before a forward"):
            tiny_model(input_ids=torch.ones(1, 3, dtype=torch.long))
        with pytest.raises(ConfigError, match="not in this group"):
            group.route(RowGroups.build(["b"], [1], torch.ones(1, 3, dtype=torch.long)))
    with pytest.raises(ConfigError, match="add up to"):
        RowGroups.build(["a", "b"], [1, 1], torch.ones(3, 2))
