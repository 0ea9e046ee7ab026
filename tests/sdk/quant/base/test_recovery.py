"""The accuracy-recovery adapter: distillation lowers the quantized model's divergence from the fp model, the adapter
is stored in the base (version 2, its own fingerprint), and the SDK and the device runtime compute the same base."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowra.device_runtime.formats.container import parse_header
from lowra.device_runtime.formats.quantized_base import QuantizedBase, read_quantized_base
from lowra.device_runtime.runtime import BaseWeights
from lowra.sdk.errors import BudgetError, ConfigError
from lowra.sdk.quant.base.apply import quantize_model
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.recovery import (
    RecoveryConfig,
    _distillation_loss,
    compress_recovery,
    recover_quantized_base,
)
from lowra.sdk.quant.lowbit_linear import load_quantized_base
from lowra.sdk.training.calibration import calibration_batches
from lowra.sdk.workflow import model_fingerprint

from tests.conftest import build_tiny_model
from tests.export.executorch.test_executorch_artifacts import requires_executorch

FAST = RecoveryConfig(rank=4, alpha=8.0, steps=40, learning_rate=1e-2, warmup_steps=2, batch_size=4, length=32,
                      sequences=16, bits=None)  # float16 factors (version 2); version 3 below, from the same adapter


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("recovery")
    plain = quantize_model(build_tiny_model(), QuantizeConfig(bits=6.0, group_size=0, calibration=None,
                                                              codebook_format="float16"),  # versions 2 and 3 here
                           progress=False, source="tiny")
    plain_path = plain.write(folder / "plain.safetensors")
    recovered = recover_quantized_base(build_tiny_model(), tiny_tokenizer, plain_path, folder / "recovered.safetensors",
                                       FAST, progress=False)
    assert recovered.recovery is not None
    return plain_path, folder / "recovered.safetensors"


@pytest.fixture(scope="module")
def compressed(bases, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The version-2 base's recovery adapter through the user adapters' codec, written as a version-3 base. At 16 bits:
    the tiny adapter (4,096 parameters) needs 3.3 bits per parameter for the blob's header alone, so lower budgets
    leave its factors far from the trained ones (SmolLM2's is compressed at 1 bit; docs/RESULTS.md)."""
    plain_path, recovered_path = bases
    recovered, plain = read_quantized_base(recovered_path), read_quantized_base(plain_path)
    recovery = compress_recovery(recovered.recovery, 16.0, plain.fingerprint)
    out = tmp_path_factory.mktemp("compressed") / "compressed.safetensors"
    QuantizedBase(layers=plain.layers, dense=plain.dense, metadata=plain.metadata, fingerprint="",
                  aliases=plain.aliases, recovery=recovery).write(out)
    return out


def kl_to_fp(model: torch.nn.Module, tokenizer) -> float:
    teacher = build_tiny_model()
    batches = calibration_batches(tokenizer, sequences=8, length=32, batch_size=8, seed=99)  # other windows
    with torch.no_grad():
        return float(np.mean([float(_distillation_loss(model(**b).logits, teacher(**b).logits, 1.0)) for b in batches]))


def test_distillation_brings_the_quantized_model_closer_to_fp(bases, tiny_tokenizer) -> None:
    plain_path, recovered_path = bases
    recovered = read_quantized_base(recovered_path)
    training = recovered.recovery.info["training"]
    assert training["kl_last"] < 0.8 * training["kl_first"]
    plain_model, recovered_model = build_tiny_model(), build_tiny_model()
    load_quantized_base(plain_model, plain_path)
    load_quantized_base(recovered_model, recovered_path)
    # Measured on windows the adapter was not trained on.
    assert kl_to_fp(recovered_model, tiny_tokenizer) < 0.9 * kl_to_fp(plain_model, tiny_tokenizer)


def test_the_recovered_base_is_a_version_2_file_and_another_base(bases) -> None:
    plain_path, recovered_path = bases
    plain, recovered = read_quantized_base(plain_path), read_quantized_base(recovered_path)
    header = parse_header(recovered_path.read_bytes(), recovered_path.stat().st_size, "t")
    assert header.metadata["format_version"] == "2"
    assert recovered.recovery.info["plain_fingerprint"] == plain.fingerprint != recovered.fingerprint
    assert set(recovered.recovery.factors) == set(plain.layers)
    for name, qw in plain.layers.items():  # the low-bit layers are the plain base's, untouched
        assert recovered.layers[name].codes.tobytes() == qw.codes.tobytes()
    assert recovered.bits_report()["recovery_bits"] > 0


def test_recovering_an_integer_level_base_keeps_its_codebooks_in_a_version_4_file(tmp_path, tiny_tokenizer) -> None:
    plain = quantize_model(build_tiny_model(), QuantizeConfig(bits=6.0, group_size=0, calibration=None),
                           progress=False, source="tiny")
    assert plain.codebook_format == "int"  # the default
    plain_path = plain.write(tmp_path / "plain.safetensors")
    config = RecoveryConfig(**{**FAST.__dict__, "steps": 2})
    recovered = recover_quantized_base(build_tiny_model(), tiny_tokenizer, plain_path, tmp_path / "r.safetensors",
                                       config, progress=False)
    header = parse_header((tmp_path / "r.safetensors").read_bytes(), (tmp_path / "r.safetensors").stat().st_size, "t")
    assert header.metadata["format_version"] == "4" and recovered.codebook_format == "int"
    assert not any(n.endswith(".codebooks") for n in header.tensors)
    for name, qw in read_quantized_base(plain_path).layers.items():
        assert recovered.layers[name].codebooks.tobytes() == qw.codebooks.tobytes()
    assert recovered.recovery.info["plain_fingerprint"] == plain.fingerprint != recovered.fingerprint


def test_a_compressed_recovery_adapter_is_a_version_3_file_of_the_same_adapter(bases, compressed) -> None:
    plain_path, recovered_path = bases
    plain, v2, v3 = (read_quantized_base(p) for p in (plain_path, recovered_path, compressed))
    header = parse_header(compressed.read_bytes(), compressed.stat().st_size, "t")
    assert header.metadata["format_version"] == "3"
    assert [n for n in header.tensors if n.startswith("recovery.")] == ["recovery.blob"]
    assert len({plain.fingerprint, v2.fingerprint, v3.fingerprint}) == 3
    assert v3.recovery.info["plain_fingerprint"] == plain.fingerprint and v3.recovery.info["compressed_bits"] == 16.0
    assert v3.recovery.scaling == 1.0 and set(v3.recovery.factors) == set(v2.recovery.factors)
    # The same adapter, within the codec's error: delta = scaling * B @ A.
    for name, (a, b) in v2.recovery.factors.items():
        want = v2.recovery.scaling * b.astype(np.float64) @ a.astype(np.float64)
        a3, b3 = v3.recovery.factors[name]
        got = b3.astype(np.float64) @ a3.astype(np.float64)
        assert np.linalg.norm(got - want) < 0.1 * np.linalg.norm(want), name
    assert v3.bits_report()["recovery_bytes"] == len(v3.recovery.blob)  # the blob is what the adapter costs


def test_a_budget_below_any_blob_names_the_recovery_flag(bases) -> None:
    plain_path, recovered_path = bases
    with pytest.raises(BudgetError, match="--recovery-bits"):
        compress_recovery(read_quantized_base(recovered_path).recovery, 1.0, read_quantized_base(plain_path).fingerprint)


@pytest.mark.parametrize("version", [2, 3])
def test_sdk_and_device_runtime_compute_the_same_recovered_base(bases, compressed, tiny_tokenizer, version) -> None:
    recovered_path = bases[1] if version == 2 else compressed
    sdk_model = build_tiny_model()
    load_quantized_base(sdk_model, recovered_path)
    runtime = BaseWeights(recovered_path)
    modules = list(read_quantized_base(recovered_path).layers)
    # Bit-exact decoded weights: the fingerprint an adapter trained in the SDK binds to is the runtime's.
    assert model_fingerprint(sdk_model, modules) == runtime.fingerprint(modules)
    device_model = build_tiny_model()
    state = {k: torch.from_numpy(np.array(v)) for k, v in runtime.tensors.items()}
    device_model.load_state_dict(state, strict=False)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.no_grad():
        torch.testing.assert_close(sdk_model(input_ids=ids).logits, device_model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_recovered_base_is_not_recovered_again(bases, tiny_tokenizer, tmp_path) -> None:
    _, recovered_path = bases
    with pytest.raises(ConfigError, match="already carries a recovery adapter"):
        recover_quantized_base(build_tiny_model(), tiny_tokenizer, recovered_path, tmp_path / "again", FAST,
                               progress=False)


@requires_executorch
def test_the_executorch_export_of_a_recovered_base_computes_it_and_binds_its_users(bases, tmp_path) -> None:
    """Both programs apply the recovery adapter (side: the low-rank term beside the packed op; merge: the recovered
    weight as data), and the manifest's digests are the recovered weights, so blobs bind to the recovered base."""
    from lowra.device_runtime.engines.executorch import ExecutorchEngine
    from lowra.device_runtime.errors import BaseMismatchError
    from lowra.export.executorch import ExecutorchExportConfig, export_executorch
    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.modules import linear_module_names
    from lowra.sdk.quant.config import CompressConfig
    from lowra.sdk.workflow import compress_factors

    plain_path, recovered_path = bases
    models = {}
    for name, path in (("plain", plain_path), ("recovered", recovered_path)):
        models[name] = build_tiny_model()
        load_quantized_base(models[name], path)
    folder = export_executorch(models["recovered"], tmp_path / "et", ExecutorchExportConfig(max_seq_len=16, rank=4))
    assert folder["modules"]
    ids = np.array([5, 17, 42, 9, 100, 3], dtype=np.int64)
    with torch.no_grad():
        want = models["recovered"](input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
        plain = models["plain"](input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(want - plain).max() > 1e-3  # the recovery adapter changes the output: the check below is not vacuous
    engine = ExecutorchEngine(tmp_path / "et")
    try:
        names = linear_module_names(models["recovered"])
        rng = torch.Generator().manual_seed(0)
        factors = {n: (torch.randn(4, models["recovered"].get_submodule(n).in_features, generator=rng) * 0.1,
                       torch.randn(models["recovered"].get_submodule(n).out_features, 4, generator=rng) * 0.1)
                   for n in names}
        blobs = {}
        for name, model in models.items():
            adapter = compress_factors(factors, LoraConfig(rank=4, alpha=8.0), CompressConfig(bits=8.0, weighted=False),
                                       adapter_id=f"on-{name}", base_fingerprint=model_fingerprint(model, names))
            blobs[name] = adapter.write(tmp_path / f"{name}.lowra")
        for mode in ("side", "merge"):
            engine.load_user(blobs["recovered"], mode=mode)
            engine.unload_user()
            assert np.abs(engine.logits(ids) - want).max() < 1e-4, mode
            with pytest.raises(BaseMismatchError):
                engine.load_user(blobs["plain"], mode=mode)
            assert engine.load_user(blobs["recovered"], mode=mode).adapter_id == "on-recovered"
    finally:
        engine.close()


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"steps": 0}, {"length": 1}, {"learning_rate": 0.0},
                                    {"temperature": float("nan")}, {"warmup_steps": -1}, {"bits": 0},
                                    {"bits": True}, {"bits": float("inf")}])
def test_recovery_config_is_validated(kwargs) -> None:
    with pytest.raises(ConfigError):
        RecoveryConfig(**kwargs)
