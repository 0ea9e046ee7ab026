"""The Llama-family decoder shape the graph is built for, read from a transformers config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowra.device_runtime.errors import ConfigError


@dataclass(frozen=True)
class LlamaShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    max_positions: int
    tied: bool

    @classmethod
    def from_config(cls, config: Any) -> "LlamaShape":
        model_type = getattr(config, "model_type", "")
        if model_type not in ("llama", "mistral", "qwen2", "smollm3") and not model_type.startswith("llama"):
            raise ConfigError(f"model_type {model_type!r} is not a Llama-family decoder this exporter supports")
        rope = getattr(config, "rope_scaling", None) or {}
        params = getattr(config, "rope_parameters", None) or {}
        kind = rope.get("rope_type", rope.get("type")) or params.get("rope_type") or "default"
        if kind != "default":
            raise ConfigError(f"rope type {kind!r} is not supported (default RoPE only); export refused")
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ConfigError("the model config has no rope_theta")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ConfigError("attention/MLP biases are not supported by this exporter")
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            vocab=int(config.vocab_size), hidden=int(config.hidden_size), layers=int(config.num_hidden_layers),
            heads=heads, kv_heads=int(config.num_key_value_heads), head_dim=head_dim,
            eps=float(config.rms_norm_eps), rope_theta=float(theta),
            max_positions=int(config.max_position_embeddings), tied=bool(config.tie_word_embeddings),
        )


def linear_names(layer: int) -> list[str]:
    p = f"model.layers.{layer}"
    return [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"{p}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
    ]
