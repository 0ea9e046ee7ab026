"""Input statistics of LoRA layers: the mean of x**2 per input feature, recorded while training.

Activation-aware compression (:mod:`lowra.sdk.quant.adapter_compression`) weights each feature's error by it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import Tensor, nn

from lowra.sdk.adapters.model import lora_layers

__all__ = ["input_stats", "recording_input_stats", "set_stats_token_mask"]


def input_stats(model: nn.Module) -> dict[str, Tensor]:
    """Mean of x**2 per input feature (float32 [in]) for every layer that saw tokens."""
    return {
        path: (layer.input_sq_sum / layer.input_count).float()
        for path, layer in lora_layers(model).items()
        if layer.input_sq_sum is not None and layer.input_count > 0
    }


@contextmanager
def recording_input_stats(model: nn.Module, reset: bool = True) -> Iterator[None]:
    """Accumulate input statistics on every LoRA layer while the block runs."""
    layers = list(lora_layers(model).values())
    previous = [layer.record_input_stats for layer in layers]
    for layer in layers:
        if reset:
            layer.reset_input_stats()
        layer.record_input_stats = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.record_input_stats = was
            layer.stats_token_mask = None


def set_stats_token_mask(model: nn.Module, mask: Tensor | None) -> None:
    """Tell every LoRA layer which tokens of the next forward count for statistics."""
    for layer in lora_layers(model).values():
        layer.stats_token_mask = mask
