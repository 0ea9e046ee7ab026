"""The CLI tests' tiny adapter: random LoRA factors on the shared tiny model, its base folder, and its blob."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.model import inject_lora, lora_layers, set_adapter_factors
from lowra.sdk.quant.config import CompressConfig
from lowra.sdk.workflow import compress_factors, model_fingerprint

from tests.conftest import build_tiny_model

LORA = LoraConfig(rank=4, alpha=8.0)


def random_adapter(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = inject_lora(model, LORA, "u")
    factors = {}
    for n in names:
        layer = lora_layers(model)[n]
        factors[n] = (torch.randn(4, layer.in_features, generator=g) * 0.3, torch.randn(layer.out_features, 4, generator=g) * 0.3)
    set_adapter_factors(model, "u", factors, LORA.scaling)
    return factors


def make_blob(model, factors, fingerprint, bits=8.0):  # tiny: the header alone is ~3.6 bits/param
    return compress_factors(factors, LORA, CompressConfig(bits=bits), adapter_id="u", base_fingerprint=fingerprint)


@pytest.fixture
def tiny_base_dir(tmp_path: Path) -> Path:
    model = build_tiny_model()
    path = tmp_path / "tiny-base"
    model.save_pretrained(path)
    return path


@pytest.fixture
def tiny_blob_file(tmp_path: Path) -> Path:
    """A real blob file of a random adapter on the tiny model, bound to that model."""
    model = build_tiny_model()
    factors = random_adapter(model)
    return make_blob(model, factors, model_fingerprint(model, list(factors))).write(tmp_path / "u.lowra")
