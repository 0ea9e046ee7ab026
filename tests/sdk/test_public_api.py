"""The curated public API (``from lowra import sdk``) and the torch-free configs the CLI parser builds on."""
from __future__ import annotations

import pytest

from lowra import sdk
from tests.conftest import run_with_blocked_imports

CONFIG_MODULES = {
    "LoraConfig": "lowra.sdk.adapters.config",
    "TrainConfig": "lowra.sdk.training.config",
    "CompressConfig": "lowra.sdk.quant.config",
    "QuantizeConfig": "lowra.sdk.quant.base.config",
}


def test_configs_and_sdk_import_without_torch() -> None:
    imports = "; ".join(f"from {module} import {name}" for name, module in CONFIG_MODULES.items())
    done = run_with_blocked_imports(
        f"""
        import lowra.sdk
        from lowra import sdk
        {imports}
        print(LoraConfig(rank=4).scaling, TrainConfig().steps, CompressConfig().bits, QuantizeConfig().bits)
        print(sdk.LoraConfig is LoraConfig, sdk.QuantizeConfig is QuantizeConfig, "load_base" in dir(sdk))
        """,
        blocked=("torch", "transformers", "tqdm"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8.0", "60", "1.0", "1.5", "True", "True", "True"]


@pytest.mark.parametrize("name", sdk.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(sdk, name) is not None
    assert name in dir(sdk)


def test_readme_flow_names_come_from_the_public_api() -> None:
    from lowra.sdk.adapters.model import get_adapter_factors
    from lowra.sdk.quant.base.apply import quantize_model
    from lowra.sdk.training.train import train_adapter

    assert sdk.train_adapter is train_adapter and sdk.get_adapter_factors is get_adapter_factors
    assert sdk.quantize_model is quantize_model
    for name in ("load_base", "load_user_dataset", "LoraConfig", "TrainConfig", "train_adapter", "evaluate_loss",
                 "save_adapter", "load_adapter", "get_adapter_factors", "CompressConfig", "compress_factors",
                 "model_fingerprint", "QuantizeConfig", "quantize_model", "cached_quantized_base",
                 "load_quantized_base"):
        assert name in sdk.__all__


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'train'.*public names"):
        sdk.train  # noqa: B018
    assert not hasattr(sdk, "lora")
