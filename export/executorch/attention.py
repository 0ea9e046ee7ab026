"""Attention as one op in an exported program: ``lowra::attention``, and the transformers attention function that
calls it.

Lowered from transformers' ``sdpa`` attention, one decode step of a static-cache program spends most of its attention
time copying: the key cache is transposed for ``q @ k^T`` (a ``permute_copy`` of the whole cache, every layer, every
step) and grouped-query heads are repeated with ``expand_copy`` (measured with ETDump on SmolLM2: 12.8 + 3.3 ms of a
~58 ms step). ``lowra::attention(q, k, v, mask, scale)`` reads the cache where it is:

- ``q`` float32 ``[B, H, Q, D]``, ``k`` / ``v`` float32 ``[B, KV, S, D]`` with ``H % KV == 0`` (query head ``h`` reads
  key/value head ``h // (H / KV)``), ``mask`` ``[B or 1, H or 1, Q, S]``, bool (True attends) or float (added to the
  scores), or None: causal from the top left when ``Q > 1`` (``torch.nn.functional.scaled_dot_product_attention``'s
  ``is_causal``), no mask when ``Q == 1``;
- returns float32 ``[B, Q, H, D]``: ``softmax(scale * q k^T + mask) v``, already in the layout the output projection
  reads (sdpa's output is transposed back by a copy). A query row whose keys are all masked gives zeros.

The native kernel is in ``lowbit_kernels.cpp``; the reference below is plain torch (what export traces and what the
kernel is tested against).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lowra.device_runtime.errors import ConfigError
from lowra.sdk.quant.ops import NAMESPACE, out_variant

__all__ = ["ATTENTION_NAME", "attention_reference", "lowra_attention_forward", "use_lowra_attention"]

ATTENTION_NAME = "lowra"  # the name registered with transformers' attention and mask interfaces

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_LIB.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
_LIB.define("attention.out(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, *, Tensor(a!) out) -> Tensor(a!)")


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    ok = (q.dim() == k.dim() == v.dim() == 4 and q.dtype == k.dtype == v.dtype == torch.float32
          and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
          and k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0)
    if not ok:
        raise ConfigError(
            f"lowra::attention got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} ({q.dtype}); expected "
            "float32 q [B, H, Q, D] and k = v [B, KV, S, D] with H a multiple of KV")
    if mask is not None:
        b, h, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if (mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, h) or mask.shape[2] != n_q
                or mask.shape[3] != n_k or mask.dtype not in (torch.bool, torch.float32)):
            raise ConfigError(f"lowra::attention mask is {mask.dtype} {list(mask.shape)}; expected bool or float32 "
                              f"[1 or {b}, 1 or {h}, {n_q}, {n_k}]")


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """The op in plain torch (see the module docstring)."""
    _check(q, k, v, mask)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is None and q.shape[2] > 1:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return (weights @ v).transpose(1, 2).contiguous()


_LIB.impl("attention", attention_reference, "CompositeExplicitAutograd")
_LIB.impl("attention.out", out_variant(attention_reference), "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::attention", lib=_LIB)
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    _check(q, k, v, mask)
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))


def lowra_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature (``AttentionInterface``) on ``lowra::attention``: inference only."""
    if dropout:
        raise ConfigError("lowra attention is for inference programs; it has no dropout")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.float()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return torch.ops.lowra.attention(query, key, value, attention_mask, float(scale)), None


def use_lowra_attention(model: torch.nn.Module) -> None:
    """Make a transformers model (already a private copy) run ``lowra::attention`` with sdpa's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, lowra_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
