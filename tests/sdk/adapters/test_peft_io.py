"""PEFT adapter folders: exact round trips, atomic writes, refusals, and peft itself loading what we write."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.model import get_adapter_factors, inject_lora, set_active_adapters, set_adapter_factors
from lowra.sdk.adapters.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INPUT_STATS_FILE, load_adapter, save_adapter
from lowra.sdk.errors import AdapterFileError, ConfigError
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.data import load_user_dataset
from lowra.sdk.training.train import train_adapter

FAST = TrainConfig(steps=6, batch_size=4, learning_rate=1e-2, warmup_steps=2, max_len=64)


def _trained(tiny_model, tiny_tokenizer, tiny_user_dir, lora: LoraConfig | None = None):
    ds = load_user_dataset(tiny_user_dir)
    result = train_adapter(tiny_model, tiny_tokenizer, ds, lora or LoraConfig(rank=4), FAST, progress=False)
    return ds, result


def test_save_load_round_trip_exact(tiny_model, tiny_tokenizer, tiny_user_dir, tmp_path: Path) -> None:
    lora = LoraConfig(rank=4, alpha=8.0)
    _, result = _trained(tiny_model, tiny_tokenizer, tiny_user_dir, lora)
    out = save_adapter(tiny_model, "default", tmp_path / "adapter", lora, input_stats=result.input_stats,
                       base_name_or_path="tiny")
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, INPUT_STATS_FILE])
    loaded = load_adapter(out)
    original = get_adapter_factors(tiny_model, "default")
    assert loaded.lora.rank == 4 and loaded.lora.alpha == 8.0
    assert loaded.factors.keys() == original.keys()
    for path, (a, b) in original.items():
        assert torch.equal(loaded.factors[path][0], a) and torch.equal(loaded.factors[path][1], b)
    assert loaded.input_stats is not None
    assert all(torch.equal(loaded.input_stats[k], result.input_stats[k]) for k in result.input_stats)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["base_model_name_or_path"] == "tiny"
    assert cfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    keys = load_file(str(out / ADAPTER_WEIGHTS))
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert keys["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 4)


def test_save_in_half_precision(tiny_model, tiny_tokenizer, tiny_user_dir, tmp_path: Path) -> None:
    _trained(tiny_model, tiny_tokenizer, tiny_user_dir)
    out = save_adapter(tiny_model, "default", tmp_path / "a16", LoraConfig(rank=4), dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / ADAPTER_WEIGHTS)).values())
    loaded = load_adapter(out)
    assert loaded.input_stats is None
    assert all(a.dtype == torch.float32 for a, _ in loaded.factors.values())


def test_save_refuses_overwrite_and_is_atomic(tiny_model, tmp_path: Path, monkeypatch) -> None:
    lora = LoraConfig(rank=4)
    inject_lora(tiny_model, lora)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(AdapterFileError, match="overwrite=True"):
        save_adapter(tiny_model, "default", out, lora)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # A crash half-way through writing leaves the old folder untouched and no temp litter.
    import lowra.sdk.adapters.peft_io as peft_io

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(peft_io, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(tiny_model, "default", out, lora, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()

    save_adapter(tiny_model, "default", out, lora, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # An empty folder (e.g. made by the caller) is not "existing work" and is filled.
    empty = tmp_path / "empty"
    empty.mkdir()
    save_adapter(tiny_model, "default", empty, lora)
    assert (empty / ADAPTER_WEIGHTS).is_file()


def test_save_rejects_mismatched_config(tiny_model, tmp_path: Path) -> None:
    inject_lora(tiny_model, LoraConfig(rank=4))
    with pytest.raises(ConfigError, match="rank 4"):
        save_adapter(tiny_model, "default", tmp_path / "x", LoraConfig(rank=8))
    assert not (tmp_path / "x").exists()


def test_load_adapter_errors(tiny_model, tmp_path: Path) -> None:
    lora = LoraConfig(rank=4)
    inject_lora(tiny_model, lora)
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_adapter(tmp_path / "none")
    out = save_adapter(tiny_model, "default", tmp_path / "a", lora)
    tensors = load_file(str(out / ADAPTER_WEIGHTS))

    missing_b = dict(tensors)
    del missing_b["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(missing_b, str(out / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterFileError, match="model.layers.1.mlp.up_proj.*lora_B"):
        load_adapter(out)

    bad_shape = dict(tensors)
    bad_shape["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 32)
    save_file(bad_shape, str(out / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterFileError, match="q_proj.*expected"):
        load_adapter(out)

    (out / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="safetensors"):
        load_adapter(out)
    (out / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterFileError, match=f"missing {ADAPTER_WEIGHTS}"):
        load_adapter(out)


def test_loaded_adapter_reproduces_model(tiny_model, tiny_model_factory, tiny_tokenizer, tiny_user_dir,
                                         tmp_path: Path) -> None:
    lora = LoraConfig(rank=4, alpha=8.0)
    _trained(tiny_model, tiny_tokenizer, tiny_user_dir, lora)
    out = save_adapter(tiny_model, "default", tmp_path / "a", lora)
    files = load_adapter(out)
    fresh = tiny_model_factory()
    set_adapter_factors(fresh, "user", files.factors, files.lora.scaling)
    set_active_adapters(fresh, "user")
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"]])
def test_peft_loads_our_adapter_with_same_logits(tiny_model, tiny_model_factory, tiny_tokenizer, tiny_user_dir,
                                                 tmp_path: Path, targets) -> None:
    peft = pytest.importorskip("peft")
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    _trained(tiny_model, tiny_tokenizer, tiny_user_dir, lora)
    out = save_adapter(tiny_model, "default", tmp_path / "peft", lora)
    peft_model = peft.PeftModel.from_pretrained(tiny_model_factory(), str(out))
    peft_model.eval()
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tiny_model(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
        base = tiny_model_factory()(input_ids=ids).logits
    assert not torch.allclose(ours, base, atol=1e-4)  # the adapter really changes the output
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
