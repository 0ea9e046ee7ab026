"""The fleet's memory plan: the estimate against what was measured, the planner's choices, its refusals."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowra.sdk.adapters.model import lora_layers
from lowra.sdk.errors import ConfigError
from lowra.sdk.fleet.memory import (
    GIB,
    ModelShape,
    available_memory,
    fit_workers,
    training_bytes_per_user,
    worker_bytes,
)
from lowra.sdk.fleet.runner import FleetSettings, plan_memory
from lowra.sdk.fleet.train import train_users
from lowra.sdk.training.config import TrainConfig

from tests.conftest import build_tiny_model
from tests.sdk.fleet.test_train import LORA, config, user

# SmolLM2-135M-Instruct's config.json (the fields the estimate reads).
SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "vocab_size": 49152,
           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}


def test_shape_counts_smollm2_parameters_exactly() -> None:
    shape = ModelShape.from_config(SMOLLM2)
    assert (shape.layers, shape.hidden, shape.intermediate) == (30, 576, 1536)
    assert shape.parameters == 134_515_008  # model.num_parameters() of the real checkpoint
    untied = ModelShape.from_config({**SMOLLM2, "tie_word_embeddings": False})
    assert untied.parameters - shape.parameters == 49152 * 576
    with pytest.raises(ConfigError, match="lacks 'hidden_size'"):
        ModelShape.from_config({"num_hidden_layers": 2, "vocab_size": 10})


def test_estimate_covers_what_was_measured_without_wasting_a_worker() -> None:
    shape = ModelShape.from_config(SMOLLM2)
    # Measured on SmolLM2 (batch 4, max_len 160): one train_users step grows 1.36-1.50 GB per user in the batch ...
    assert training_bytes_per_user(shape, batch_size=4, max_len=160) >= 1.50e9
    # ... and a Ray fleet worker at K=4 held up to 7.67 GiB after several batches: the plan must not be below it (an
    # underestimate is an OOM kill), nor so far above that 2 workers no longer fit Ray's 16.36 GiB on this machine.
    need = worker_bytes(shape, 4, 4, 160)
    assert 7.67 * GIB <= need <= 16.36 * GIB / 2


def test_fit_workers_counts_per_node_and_refuses_with_the_batch_that_fits() -> None:
    need, per_user = 6 * GIB, int(1.35 * GIB)
    assert fit_workers(2, need, [16 * GIB], batch_users=4, per_user=per_user) == 2
    assert fit_workers(2, need, [11 * GIB], batch_users=4, per_user=per_user) == 1
    assert fit_workers(8, need, [12 * GIB, 12 * GIB, 4 * GIB], batch_users=4, per_user=per_user) == 4
    with pytest.raises(ConfigError, match=r"needs ~22\.0 GiB .* 16\.0 GiB; use --batch-users 11"):
        fit_workers(1, 22 * GIB, [16 * GIB], batch_users=16, per_user=per_user)
    with pytest.raises(ConfigError, match="lower the training batch size or --max-len"):
        fit_workers(1, 22 * GIB, [GIB], batch_users=16, per_user=per_user)


def test_available_memory_reads_meminfo_and_a_cgroup_cap(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory(meminfo, tmp_path / "none") == 20000000 * 1024
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert available_memory(meminfo, tmp_path) == 7 * GIB
    (tmp_path / "memory.max").write_text("max\n")
    assert available_memory(meminfo, tmp_path) == 20000000 * 1024
    assert available_memory(tmp_path / "absent", tmp_path / "none") is None


class _ShapedBase:
    def __call__(self):  # pragma: no cover - the plan never loads the model
        raise AssertionError("planning must not load weights")

    def shape(self) -> ModelShape:
        return ModelShape.from_config(SMOLLM2)


def test_plan_memory_reserves_per_worker_and_skips_unshaped_sources(tmp_path: Path) -> None:
    settings = FleetSettings(registry=str(tmp_path / "r.db"), out=str(tmp_path), base=_ShapedBase(),
                             train=TrainConfig(batch_size=4, max_len=160), batch_users=4)
    workers, need = plan_memory(settings, 2, [int(16.36 * GIB)])  # Ray's memory on this 24 GB machine
    assert (workers, need) == (2, worker_bytes(ModelShape.from_config(SMOLLM2), 4, 4, 160))
    settings16 = FleetSettings(registry=settings.registry, out=settings.out, base=_ShapedBase(),
                               train=settings.train, batch_users=16)
    with pytest.raises(ConfigError, match="use --batch-users 8"):
        plan_memory(settings16, 2, [int(16.36 * GIB)])
    unshaped = FleetSettings(registry=settings.registry, out=settings.out, base=lambda: None)
    assert plan_memory(unshaped, 2, [GIB]) == (2, None)


def test_train_users_refuses_a_batch_that_cannot_fit_before_touching_the_model(tiny_tokenizer, monkeypatch) -> None:
    model = build_tiny_model()
    monkeypatch.setattr("lowra.sdk.fleet.train.available_memory", lambda: 1024)
    with pytest.raises(ConfigError, match=r"training 2 users at once needs .* only 0\.0 GiB .*--batch-users"):
        train_users(model, tiny_tokenizer, [user(0), user(1)], LORA, config(0), progress=False)
    assert not lora_layers(model)
    monkeypatch.setattr("lowra.sdk.fleet.train.available_memory", lambda: None)  # unknown: trains
    assert set(train_users(model, tiny_tokenizer, [user(0)], LORA, config(0, steps=1), progress=False)) == {"u0"}
