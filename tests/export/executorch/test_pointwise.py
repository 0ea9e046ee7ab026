"""lowra::rope and lowra::silu_mul (export/executorch/pointwise.py): the references against transformers' code they
replace, the native kernels against the references, and the swaps that leave other model families alone."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from lowra.device_runtime.errors import ConfigError
from tests.export.executorch.test_executorch import _run
from tests.export.executorch.test_executorch_artifacts import _ROOT, requires_executorch

pytestmark = requires_executorch


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    return LlamaForCausalLM(config).eval()


def test_references_compute_what_transformers_computes():
    import torch
    from transformers.models.llama import modeling_llama

    from lowra.export.executorch.pointwise import LowraGatedMLP, rope_reference, silu_mul_reference

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    cos, sin = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    want_q, want_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rope_reference(q, cos, sin), want_q) and torch.equal(rope_reference(k, cos, sin), want_k)
    gate, up = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    assert torch.equal(silu_mul_reference(gate, up), torch.nn.functional.silu(gate) * up)
    mlp = tiny_llama().model.layers[0].mlp
    x = torch.randn(1, 3, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(LowraGatedMLP(mlp)(x), mlp(x))
    with pytest.raises(ConfigError, match=r"expected float32 x \[B, H, S, D\] \(D even\)"):
        rope_reference(q[..., :15], cos[..., :15], sin[..., :15])
    with pytest.raises(ConfigError, match="expected float32 tensors of one shape"):
        silu_mul_reference(gate, up[:, :6])


def test_native_kernels_match_the_references():
    """Both ops in a program run by ExecuTorch with lowra's kernel library, against the torch references (cos/sin
    per batch and broadcast over it; large and small gates)."""
    import torch
    from executorch.exir import to_edge_transform_and_lower

    from lowra.export.executorch import load_kernel_library
    from lowra.export.executorch.pointwise import rope_reference, silu_mul_reference

    class Calls(torch.nn.Module):
        def forward(self, x, cos, sin, cos1, sin1, gate, up):
            return (torch.ops.lowra.rope(x, cos, sin), torch.ops.lowra.rope(x, cos1, sin1),
                    torch.ops.lowra.silu_mul(gate, up))

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 8, generator=g)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    gate = torch.randn(4, 33, generator=g) * 12  # exp(-gate) over and underflows at the ends
    inputs = (x, cos, sin, cos[:1], sin[:1], gate, torch.randn(4, 33, generator=g))
    load_kernel_library()
    program = to_edge_transform_and_lower(torch.export.export(Calls(), inputs, strict=True)).to_executorch()
    path = _ROOT / "pointwise.pte"
    path.write_bytes(program.buffer)
    got = _run(path, [t.numpy() for t in inputs])
    want = [rope_reference(x, cos, sin), rope_reference(x, cos[:1], sin[:1]), silu_mul_reference(gate, inputs[6])]
    np.testing.assert_array_equal(got[0], want[0].numpy())  # the same roundings in the same order
    np.testing.assert_array_equal(got[1], want[1].numpy())
    np.testing.assert_allclose(got[2], want[2].numpy(), rtol=2e-6, atol=1e-7)


def test_swaps_apply_to_llama_and_leave_other_code_alone():
    import torch
    from torch import nn

    from lowra.export.executorch.pointwise import LowraGatedMLP, lowra_rope, use_lowra_gated_mlp
    from transformers.models.llama import modeling_llama

    model = tiny_llama()
    original = modeling_llama.apply_rotary_pos_emb
    with lowra_rope(model) as switched:
        assert switched == 1 and modeling_llama.apply_rotary_pos_emb is not original
    assert modeling_llama.apply_rotary_pos_emb is original  # restored on exit
    assert use_lowra_gated_mlp(model) == 2
    assert all(isinstance(layer.mlp, LowraGatedMLP) for layer in model.model.layers)

    # A family whose rotary embedding is interleaved (GPT-J style) and whose MLP uses GELU: both left as they are.
    family = types.ModuleType("lowra_test_interleaved_family")

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        def rotate(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    family.apply_rotary_pos_emb = apply_rotary_pos_emb

    class Attention(nn.Module):
        head_dim = 8

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.act_fn = nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    Attention.__module__ = family.__name__
    sys.modules[family.__name__] = family
    try:
        other = nn.ModuleDict({"attn": Attention(), "mlp": MLP()})
        with lowra_rope(other) as switched:
            assert switched == 0 and family.apply_rotary_pos_emb is apply_rotary_pos_emb
        assert use_lowra_gated_mlp(other) == 0 and isinstance(other["mlp"], MLP)
    finally:
        del sys.modules[family.__name__]


def test_exported_program_calls_one_op_per_rotary_embedding_and_mlp():
    import json

    from tests.export.executorch.test_executorch_artifacts import _operator_calls, exported, lowbit_tiny

    folder = exported()
    assert json.loads((folder / "manifest.json").read_text())["pointwise"] == "lowra"
    assert json.loads((exported("aten", ("side",), False) / "manifest.json").read_text())["pointwise"] == "torch"
    n_layers = len(lowbit_tiny()[0].model.layers)
    for mode in ("side", "merge"):
        calls = _operator_calls(folder / f"{mode}.pte")
        assert calls["lowra::rope.out"] == 2 * n_layers, mode  # q and k of every layer
        assert calls["lowra::silu_mul.out"] == n_layers, mode
        assert calls["aten::neg.out"] == calls["aten::sigmoid.out"] == 0, mode
