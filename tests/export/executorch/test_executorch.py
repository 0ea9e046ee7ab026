"""The native ExecuTorch kernels (lowra::dequantize.out, lowra::lowbit_linear.out) against the numpy reference,
the kernel build, and the core-ATen fallback decode."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from tests.export.executorch.test_executorch_artifacts import _ROOT, requires_executorch

pytestmark = requires_executorch

# Hand-checkable golden vectors: 3 rows of 10 inputs at widths 4, 1, 2, groups of 4 (the last one partial).
# Codes (LSB-first): row 0 [15,10,10,14,9,12,13,3,0,4], row 1 [0,1,1,0,0,1,0,1,0,0], row 2 [3,1,1,1,2,1,3,1,1,2].
GOLDEN = QuantizedWeight(
    out_features=3,
    in_features=10,
    group_size=4,
    widths=np.array([4, 1, 2], np.uint8),
    codes=np.array([175, 234, 201, 61, 64, 166, 0, 87, 118, 9], np.uint8),
    codebooks=np.array([(k - 8) / 4 for k in range(16)] + [-0.5, 0.75] + [-1.5, -0.25, 0.5, 1.0], np.float16),
    scales=np.array([[1.0, 0.5, 2.0], [0.25, 4.0, 1.5], [2.0, 0.125, 3.0]], np.float16),
)
GOLDEN_WEIGHT = np.array(
    [
        [1.75, 0.5, 0.5, 1.5, 0.125, 0.5, 0.625, -0.625, -4.0, -2.0],
        [-0.125, 0.1875, 0.1875, -0.125, -2.0, 3.0, -2.0, 3.0, -0.75, -0.75],
        [2.0, -0.5, -0.5, -0.5, 0.0625, -0.03125, 0.125, -0.03125, -0.75, 1.5],
    ],
    np.float32,
)


def random_weight(out_features: int, in_features: int, group_size: int, seed: int) -> QuantizedWeight:
    from lowra.device_runtime.formats import pack_codes

    rng = np.random.default_rng(seed)
    widths = rng.choice(np.array([1, 2, 4], np.uint8), out_features)
    codes = [pack_codes(rng.integers(0, 1 << w, (1, in_features)).astype(np.uint8), int(w))[0] for w in widths]
    books = [np.sort(rng.standard_normal(1 << w)).astype(np.float16) for w in widths]
    n_groups = -(-in_features // group_size) if group_size else 0
    qw = QuantizedWeight(
        out_features, in_features, group_size, widths, np.concatenate(codes), np.concatenate(books),
        rng.uniform(0.01, 2.0, (out_features, n_groups)).astype(np.float16),
    )  # fmt: skip
    qw.validate()
    return qw


WEIGHTS = [GOLDEN, random_weight(23, 37, 16, seed=3), random_weight(9, 70, 0, seed=4)]


@functools.cache
def _decode_program(ops: str = "custom", tokens: int = 4):
    """One ExecuTorch program over WEIGHTS returning, per weight, (decoded W, x @ W^T + bias) for x [tokens, in]."""
    import torch
    from executorch.exir import to_edge_transform_and_lower

    from lowra.export.executorch import AtenLowBitLinear, fix_empty_strides, load_kernel_library
    from lowra.sdk.quant.lowbit_linear import LowBitLinear

    biases = [torch.linspace(-1, 1, qw.out_features) for qw in WEIGHTS]
    layers = [LowBitLinear.from_quantized(qw, bias=b) for qw, b in zip(WEIGHTS, biases)]

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(layers if ops == "custom" else [AtenLowBitLinear(x) for x in layers])

        def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = []
            for layer, x in zip(self.layers, xs):
                weight = layer.dequantize() if ops == "custom" else layer.decode()
                out += [weight + 0.0 * x.sum(), layer(x)]
            return tuple(out)

    module = Decode()
    fix_empty_strides(module)
    if ops == "custom":
        load_kernel_library()
    example = tuple(torch.randn(tokens, qw.in_features) for qw in WEIGHTS)
    program = to_edge_transform_and_lower(torch.export.export(module, example, strict=True)).to_executorch()
    path = _ROOT / f"decode-{ops}-{tokens}.pte"
    path.write_bytes(program.buffer)
    return path, [b.numpy() for b in biases]


def _run(path, xs: list[np.ndarray]) -> list[np.ndarray]:
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return [t.numpy() for t in method.execute([torch.from_numpy(x) for x in xs])]


def test_kernel_library_builds_once_and_is_reused(tmp_path):
    from lowra.export.executorch.kernels import build_kernel_library

    first = build_kernel_library()
    mtime = first.stat().st_mtime_ns
    assert build_kernel_library() == first and first.stat().st_mtime_ns == mtime  # cached by source hash
    private = build_kernel_library(cache_dir=tmp_path)
    assert private.parent == tmp_path and private.stat().st_size > 0


def test_numpy_reference_matches_hand_computed_golden():
    assert np.array_equal(GOLDEN.dequantize(), GOLDEN_WEIGHT)


def test_one_token_runs_the_lookup_table_gemv_within_float_rounding_of_the_reference():
    """A single token goes through the bit-plane lookup-table GEMV (a different summation order than x @ W^T)."""
    path, biases = _decode_program("custom", 1)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, qw.in_features)).astype(np.float32) for qw in WEIGHTS]
    outputs = _run(path, xs)
    for i, (qw, x, bias) in enumerate(zip(WEIGHTS, xs, biases)):
        reference = x.astype(np.float64) @ qw.dequantize().T.astype(np.float64) + bias
        np.testing.assert_allclose(outputs[2 * i + 1], reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("ops", ["custom", "aten"])
def test_program_decode_is_bit_exact_on_golden_and_random_weights(ops):
    """dequantize.out (custom) / the divmod+gather decode (aten) equal the numpy reference bit for bit."""
    path, biases = _decode_program(ops)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, qw.in_features)).astype(np.float32) for qw in WEIGHTS]
    outputs = _run(path, xs)
    for i, (qw, x, bias) in enumerate(zip(WEIGHTS, xs, biases)):
        weight, y = outputs[2 * i], outputs[2 * i + 1]
        reference = qw.dequantize()
        assert weight.dtype == np.float32 and np.array_equal(weight.view(np.uint32), reference.view(np.uint32))
        np.testing.assert_allclose(y, x @ reference.T + bias, rtol=1e-5, atol=1e-5)
    assert np.array_equal(outputs[0], GOLDEN_WEIGHT)
    # An identity input reads the weight back through the linear exactly (sums of exact zeros).
    eyes = [np.eye(4, qw.in_features, dtype=np.float32) for qw in WEIGHTS]
    rows = _run(path, eyes)[1]
    assert np.array_equal(rows - biases[0], GOLDEN_WEIGHT.T[:4])


def test_aten_fallback_program_has_no_custom_op():
    """The fallback runs on a stock runtime: no lowra:: operator anywhere in the program."""
    path, _ = _decode_program("aten")
    assert b"lowra::" not in path.read_bytes()
    assert b"lowra::" in _decode_program("custom")[0].read_bytes()


def test_attention_and_float16_linear_kernels_match_their_references():
    """lowra::attention.out (grouped-query heads, bool / float / no mask, a fully masked row) and lowra::f16_linear.out
    in a program, against the torch references the exporter traces (float32 sums in another order)."""
    import torch
    from executorch.exir import to_edge_transform_and_lower

    from lowra.export.executorch import load_kernel_library
    from lowra.export.executorch.attention import attention_reference
    from lowra.sdk.quant.ops import f16_linear_reference

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(37, 20, generator=g) * 0.2).half()
    bias = torch.randn(37, generator=g)

    class Calls(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)

        def forward(self, q, k, v, bool_mask, float_mask, q1, x):
            return (torch.ops.lowra.attention(q, k, v, bool_mask, 0.3),
                    torch.ops.lowra.attention(q, k, v, float_mask, 0.25),
                    torch.ops.lowra.attention(q, k, v, None, 0.125),  # causal from the top left: Q > 1
                    torch.ops.lowra.attention(q1, k, v, None, 0.5),  # one query, no mask: every key
                    torch.ops.lowra.f16_linear(x, self.weight, self.bias),
                    torch.ops.lowra.f16_linear(x, self.weight, None))

    q = torch.randn(1, 6, 5, 8, generator=g)
    k, v = torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    bool_mask = torch.rand(1, 1, 5, 7, generator=g) > 0.4
    bool_mask[0, 0, 2] = False  # a query that sees no key: zeros
    float_mask = torch.randn(1, 6, 5, 7, generator=g)
    float_mask[..., 3] = float("-inf")
    inputs = (q, k, v, bool_mask, float_mask, torch.randn(1, 6, 1, 8, generator=g), torch.randn(3, 20, generator=g))
    load_kernel_library()
    program = to_edge_transform_and_lower(torch.export.export(Calls(), inputs, strict=True)).to_executorch()
    path = _ROOT / "attention-f16.pte"
    path.write_bytes(program.buffer)
    got = _run(path, [t.numpy() for t in inputs])
    want = [attention_reference(q, k, v, bool_mask, 0.3), attention_reference(q, k, v, float_mask, 0.25),
            attention_reference(q, k, v, None, 0.125), attention_reference(inputs[5], k, v, None, 0.5),
            f16_linear_reference(inputs[6], weight, bias), f16_linear_reference(inputs[6], weight, None)]
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == tuple(b.shape), i
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6, err_msg=str(i))
    assert not got[0][0, 2].any()  # the fully masked query row
    assert got[0].shape == (1, 5, 6, 8)  # [B, Q, H, D]: the layout the output projection reads


@pytest.mark.parametrize(("tokens", "layout"), [(1, "blocked"), (4, "blocked"), (1, "planar"), (4, "planar")])
def test_kernel_layout_program_matches_the_reference(tokens, layout):
    """lowra::lowbit_linear_<layout>.out (codes stored in one of the kernels' layouts by the exporter, read in place)
    and lowra::lowbit_linear_<layout>_lora.out (plus a side branch) equal the float64 products with the numpy decode,
    for one token (lookup-table GEMV) and a prompt (blocked GEMM). "blocked" is what the exporter writes; "planar"
    is what folders exported before it store."""
    import torch
    from executorch.exir import to_edge_transform_and_lower

    from lowra.export.executorch import fix_empty_strides, load_kernel_library
    from lowra.export.executorch.exporter import KERNEL_LAYOUTS, KernelLowBitLinear
    from lowra.sdk.quant.lowbit_linear import LowBitLinear

    biases = [torch.linspace(-1, 1, qw.out_features) for qw in WEIGHTS]
    layers = [KernelLowBitLinear(LowBitLinear.from_quantized(qw, bias=b), layout) for qw, b in zip(WEIGHTS, biases)]
    for layer, qw in zip(layers, WEIGHTS):
        assert np.array_equal(layer.codes.numpy(), KERNEL_LAYOUTS[layout](qw.codes, qw.widths, qw.in_features))

    class Planar(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(layer(x) for layer, x in zip(self.layers, xs))

    rng = np.random.default_rng(tokens)
    xs = [rng.standard_normal((tokens, qw.in_features)).astype(np.float32) for qw in WEIGHTS]
    module = Planar()
    fix_empty_strides(module)
    eager = [y.numpy() for y in module(*(torch.from_numpy(x) for x in xs))]  # the torch reference of the op
    load_kernel_library()
    program = to_edge_transform_and_lower(torch.export.export(module, tuple(torch.from_numpy(x) for x in xs),
                                                              strict=True)).to_executorch()
    path = _ROOT / f"{layout}-{tokens}.pte"
    path.write_bytes(program.buffer)
    for got, want, qw, x, bias in zip(_run(path, xs), eager, WEIGHTS, xs, biases):
        reference = x.astype(np.float64) @ qw.dequantize().T.astype(np.float64) + bias.numpy()
        for y in (got, want):
            np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())

    # The same layers with a rank-3 side branch each, in one call (lowra::lowbit_linear_<layout>_lora).
    from lowra.export.executorch.exporter import KernelSideBranchLinear

    g = torch.Generator().manual_seed(tokens)
    # float16 values, as a blob's levels are: the float16 factors the program stores hold them exactly.
    factors = [(torch.randn(3, qw.in_features, generator=g).half().float(),
                torch.randn(qw.out_features, 3, generator=g).half().float()) for qw in WEIGHTS]
    module.layers = torch.nn.ModuleList(KernelSideBranchLinear(layer, d, u) for layer, (d, u) in zip(layers, factors))
    program = to_edge_transform_and_lower(torch.export.export(module, tuple(torch.from_numpy(x) for x in xs),
                                                              strict=True)).to_executorch()
    path.write_bytes(program.buffer)
    for got, qw, x, bias, (d, u) in zip(_run(path, xs), WEIGHTS, xs, biases, factors):
        reference = (x.astype(np.float64) @ qw.dequantize().T.astype(np.float64) + bias.numpy()
                     + (x.astype(np.float64) @ d.double().numpy().T) @ u.double().numpy().T)
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_packed_side_branch_reference_decodes_codes_and_books():
    """lowra::lowbit_linear_blocked_lora4's reference (what the exporter traces) is the float reference on the values
    its 4-bit codes and float16 books decode to; bad shapes are refused by name."""
    import torch

    from lowra.device_runtime.errors import ConfigError
    from lowra.export.executorch.exporter import KernelLowBitLinear
    from lowra.sdk.quant.lowbit_linear import LowBitLinear

    qw = WEIGHTS[0]
    layer = KernelLowBitLinear(LowBitLinear.from_quantized(qw), "blocked")
    g = torch.Generator().manual_seed(3)
    rank, out, inputs = 3, qw.out_features, qw.in_features
    down_codes = torch.randint(0, 256, (rank, -(-inputs // 2)), generator=g, dtype=torch.uint8)
    up_codes = torch.randint(0, 256, (rank, -(-out // 2)), generator=g, dtype=torch.uint8)
    down_books, up_books = (torch.randn(rank, 16, generator=g).half() for _ in range(2))

    def decode(codes, books, length):
        nibbles = torch.stack((codes & 15, codes >> 4), -1).reshape(rank, -1)[:, :length].long()
        return torch.gather(books.float(), 1, nibbles)

    x = torch.randn(2, inputs, generator=g)
    got = torch.ops.lowra.lowbit_linear_blocked_lora4(x, *layer.packed(), down_codes, down_books, up_codes, up_books)
    want = torch.ops.lowra.lowbit_linear_blocked_lora(x, *layer.packed(), decode(down_codes, down_books, inputs),
                                                      decode(up_codes, up_books, out).T.contiguous())
    assert torch.equal(got, want)
    with pytest.raises(ConfigError, match=r"expected uint8 \[rank, \d+\], float16 \[rank, 16\]"):
        torch.ops.lowra.lowbit_linear_blocked_lora4(x, *layer.packed(), down_codes[:, 1:], down_books, up_codes,
                                                    up_books)
