"""train_users: a user's adapter does not depend on who shared its steps, and it plugs in like train_adapter's.

Tolerance: a user trained in a group computes the same sums as ``train_adapter`` but not in the same order (a bmm
over user blocks instead of two F.linear, batches padded to the widest row of the whole group, the loss summed per
user), so results agree to float32 rounding, not bit for bit. AdamW divides each update by the running gradient
size, so a rounding difference in a gradient moves a factor by at most ~lr * (relative difference) per step: after
the 6 steps here at lr 1e-2 that stays far below the atol of 2e-5 on factors of size ~0.1-0.3 (measured: < 1e-6).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowra import sdk
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.model import adapter_names, get_adapter_factors, inject_lora, lora_layers, set_active_adapters
from lowra.sdk.adapters.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from lowra.sdk.errors import ConfigError, DatasetError
from lowra.sdk.fleet.train import train_users
from lowra.sdk.quant.lowbit_linear import LowBitLinear, replace_linears
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.data import Example, UserDataset
from lowra.sdk.training.train import TrainResult, train_adapter

from tests.conftest import build_tiny_model
from tests.sdk.quant.test_lowbit_linear import tiny_quantized

LORA = LoraConfig(rank=4)
ATOL, RTOL = 2e-5, 1e-4
TOPICS = ["pizza", "the weekend", "the meeting", "my friend", "the fox", "cheese", "the trip", "food"]
REPLIES = ["Sure! I love {}.", "No, {} is boring.", "Tell me more about {}!", "Hmm, {}? Maybe.",
           "Of course, {} is great.", "{} again? Fine.", "I wrote a note about {}.", "Thanks for {}!"]


def user(i: int, n_train: int = 12) -> UserDataset:
    """User ``u{i}``: its own reply style, so every user learns something different."""
    train = [Example(prompt=f"What about {TOPICS[(j + i) % 8]}?", response=REPLIES[i % 8].format(TOPICS[j % 8]))
             for j in range(n_train)]
    return UserDataset(user_id=f"u{i}", train=train, heldout=train[:2])


def config(i: int, **kwargs) -> TrainConfig:
    settings = {"steps": 6, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 2, "max_len": 64, "seed": 10 + i}
    return TrainConfig(**{**settings, **kwargs})


def alone(tokenizer, dataset: UserDataset, cfg: TrainConfig, model=None) -> tuple[dict, TrainResult]:
    """``train_adapter``'s factors and result for one user on a fresh tiny base."""
    model = model if model is not None else build_tiny_model()
    result = train_adapter(model, tokenizer, dataset, LORA, cfg, adapter_name=dataset.user_id, progress=False)
    return get_adapter_factors(model, dataset.user_id), result


def assert_same_user(model, result: TrainResult, ref_factors: dict, ref: TrainResult) -> None:
    factors = get_adapter_factors(model, result.adapter_name)
    assert factors.keys() == ref_factors.keys()
    for path, (a, b) in factors.items():
        torch.testing.assert_close(a, ref_factors[path][0], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(b, ref_factors[path][1], atol=ATOL, rtol=RTOL)
    assert any(float(b.abs().sum()) > 0 for _, b in factors.values())  # it really trained
    assert result.losses == pytest.approx(ref.losses, rel=1e-5)
    assert result.input_stats.keys() == ref.input_stats.keys()
    for path, stats in result.input_stats.items():
        torch.testing.assert_close(stats, ref.input_stats[path], atol=1e-7, rtol=1e-5)


def test_a_user_in_a_group_of_eight_equals_it_alone_and_train_adapter(tiny_tokenizer) -> None:
    users = [user(i) for i in range(8)]
    configs = {u.user_id: config(i) for i, u in enumerate(users)}
    grouped = build_tiny_model()
    base_before = {k: v.clone() for k, v in grouped.state_dict().items()}
    results = train_users(grouped, tiny_tokenizer, users, LORA, configs, progress=False)
    assert list(results) == [u.user_id for u in users] and adapter_names(grouped) == list(results)
    solo = build_tiny_model()
    solo_results = train_users(solo, tiny_tokenizer, [users[3]], LORA, {"u3": configs["u3"]}, progress=False)
    for i in (0, 3, 7):
        ref_factors, ref = alone(tiny_tokenizer, users[i], configs[f"u{i}"])
        assert_same_user(grouped, results[f"u{i}"], ref_factors, ref)
    assert_same_user(solo, solo_results["u3"], get_adapter_factors(grouped, "u3"), results["u3"])
    # The base never moved, the model is back in eval mode, and no adapter was left active.
    after = {k.replace(".base.", "."): v for k, v in grouped.state_dict().items() if ".lora_" not in k}
    assert after.keys() == base_before.keys() and all(torch.equal(after[k], base_before[k]) for k in after)
    assert not grouped.training
    assert all(layer.active == [] for layer in lora_layers(grouped).values())
    assert all(0 < r.seconds for r in results.values())


def test_batch_sizes_steps_and_small_datasets_do_not_leak(tiny_tokenizer) -> None:
    # Different batch sizes per step (unequal row blocks), a user that stops early, one with fewer examples
    # than its batch size: each still equals its own train_adapter run.
    users = [user(0), user(1, n_train=3), user(2), user(3)]
    configs = {"u0": config(0, batch_size=2), "u1": config(1, batch_size=4), "u2": config(2, batch_size=7, steps=3),
               "u3": config(3, batch_size=4, max_len=30)}
    model = build_tiny_model()
    results = train_users(model, tiny_tokenizer, users, LORA, configs, progress=False)
    assert [len(results[u].losses) for u in configs] == [6, 6, 3, 6]
    assert results["u2"].seconds <= results["u0"].seconds
    for i, dataset in enumerate(users):
        ref_factors, ref = alone(tiny_tokenizer, dataset, configs[dataset.user_id])
        assert_same_user(model, results[dataset.user_id], ref_factors, ref)


def test_low_bit_base_and_other_adapters(tiny_tokenizer) -> None:
    # A LowBitLinear base, plus an adapter already in the model that was active: it is off while the users train
    # (as in train_adapter) and active again afterwards.
    def low_bit_model():
        model = build_tiny_model()
        replace_linears(model, tiny_quantized())
        torch.manual_seed(99)
        inject_lora(model, LoraConfig(rank=2, targets=["q_proj"]), "recovery")
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B["recovery"])
        return model

    users = [user(i) for i in range(3)]
    configs = {u.user_id: config(i) for i, u in enumerate(users)}
    model = low_bit_model()
    results = train_users(model, tiny_tokenizer, users, LORA, configs, progress=False)
    layers = lora_layers(model)
    assert all(isinstance(layer.base, LowBitLinear) for layer in layers.values())
    assert all(layer.active == ["recovery"] for layer in layers.values())
    reference = low_bit_model()
    ref_factors, ref = alone(tiny_tokenizer, users[1], configs["u1"], model=reference)
    assert_same_user(model, results["u1"], ref_factors, ref)


def test_results_save_load_and_compress_like_train_adapter(tmp_path: Path, tiny_tokenizer) -> None:
    users = [user(i) for i in range(3)]
    cfg = config(0)
    model = build_tiny_model()
    results = train_users(model, tiny_tokenizer, users, LORA, cfg, progress=False)
    reference = build_tiny_model()
    _, ref = alone(tiny_tokenizer, users[1], cfg, model=reference)
    saved = save_adapter(model, "u1", tmp_path / "fleet", LORA, input_stats=results["u1"].input_stats)
    ref_saved = save_adapter(reference, "u1", tmp_path / "alone", LORA, input_stats=ref.input_stats)
    # The same folder: same files, same config, same tensor names and shapes (values within tolerance).
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in ref_saved.iterdir())
    assert (saved / ADAPTER_CONFIG).read_text() == (ref_saved / ADAPTER_CONFIG).read_text()
    tensors, ref_tensors = load_file(saved / ADAPTER_WEIGHTS), load_file(ref_saved / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in ref_tensors.items()}
    for key, value in tensors.items():
        torch.testing.assert_close(value, ref_tensors[key], atol=ATOL, rtol=RTOL)
    # And it loads back exactly.
    loaded = load_adapter(saved)
    factors = get_adapter_factors(model, "u1")
    assert (loaded.lora.rank, loaded.lora.alpha) == (LORA.rank, LORA.alpha) and loaded.factors.keys() == factors.keys()
    assert all(torch.equal(loaded.factors[k][0], a) and torch.equal(loaded.factors[k][1], b)
               for k, (a, b) in factors.items())
    assert all(torch.equal(loaded.input_stats[k], v) for k, v in results["u1"].input_stats.items())

    # The compressor takes the factors and statistics unchanged.
    compressed = sdk.compress_factors(
        factors, LORA, sdk.CompressConfig(bits=6.0), adapter_id="u1",
        base_fingerprint=sdk.model_fingerprint(model, list(factors)), input_stats=results["u1"].input_stats,
    )
    assert sorted(m.name for m in compressed.blob.modules) == sorted(factors)
    assert compressed.report["effective_bits"] <= 6.0
    assert compressed.blob.metadata["scheme"]["weighted"]  # it used the user's own input statistics
    set_active_adapters(model, "u1")  # the trained adapter is usable in the model as any other


def test_refusals_leave_the_model_untouched(tiny_tokenizer) -> None:
    model = build_tiny_model()
    users = [user(0), user(1)]
    cases = [
        (users, LoraConfig(rank=4, dropout=0.1), config(0), ConfigError, "dropout == 0"),
        ([user(0), user(0)], LORA, config(0), DatasetError, "appears twice"),
        ([UserDataset("empty", [], [])], LORA, config(0), DatasetError, "no training examples"),
        ([UserDataset("a.b", user(0).train, [])], LORA, config(0), ConfigError, "without '.'"),
        (users, LORA, {"u0": config(0)}, ConfigError, "no TrainConfig for users \\['u1'\\]"),
        ([], LORA, config(0), DatasetError, "at least one"),
    ]
    for datasets, lora, cfg, error, match in cases:
        with pytest.raises(error, match=match):
            train_users(model, tiny_tokenizer, datasets, lora, cfg, progress=False)
        assert not lora_layers(model)
    inject_lora(model, LORA, "u1")
    with pytest.raises(ConfigError, match="already holds an adapter named 'u1'"):
        train_users(model, tiny_tokenizer, users, LORA, config(0), progress=False)
    assert adapter_names(model) == ["u1"]
