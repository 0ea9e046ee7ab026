"""lowra:: ops against the numpy reference (the spec), opcheck, autograd and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lowra.cuda_kernels import KernelStatus, load
from lowra.device_runtime.formats import pack_codes
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.quant import ops  # noqa: F401  (registers torch.ops.lowra.*)
from lowra.sdk.errors import ConfigError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def golden_weight() -> tuple[QuantizedWeight, np.ndarray]:
    """3 rows of widths 1/2/4, 5 inputs, groups of 2 (the last partial), worked out by hand."""
    codes = np.array(
        [
            0b01101,  # row 0, 1 bit:  codes 1,0,1,1,0 LSB-first
            3 | 0 << 2 | 2 << 4 | 1 << 6, 2,  # row 1, 2 bits: codes 3,0,2,1 | 2
            0 | 15 << 4, 7 | 8 << 4, 1,  # row 2, 4 bits: codes 0,15 | 7,8 | 1
        ],
        dtype=np.uint8,
    )
    codebooks = np.concatenate(
        [[-1.0, 1.0], [-1.5, -0.5, 0.5, 1.5], np.arange(16) * 0.125 - 1.0]
    ).astype(np.float16)
    scales = np.array([[2.0, 0.5, 4.0], [1.0, 2.0, 0.25], [0.5, 1.0, 3.0]], dtype=np.float16)
    qw = QuantizedWeight(3, 5, 2, np.array([1, 2, 4], np.uint8), codes, codebooks, scales)
    expected = np.array(
        [
            [2.0, -2.0, 0.5, 0.5, -4.0],
            [1.5, -1.5, 1.0, -1.0, 0.125],
            [-0.5, 0.4375, -0.125, 0.0, -2.625],
        ],
        dtype=np.float32,
    )
    return qw, expected


def random_weight(out: int, inp: int, group_size: int, widths: list[int], seed: int = 0) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    widths_arr = np.asarray(widths, dtype=np.uint8)
    codes, books = [], []
    for w in widths_arr.tolist():
        codes.append(pack_codes(rng.integers(0, 1 << w, size=(1, inp)), w)[0])
        books.append(np.sort(rng.standard_normal(1 << w)).astype(np.float16))
    n_groups = 0 if group_size == 0 else -(-inp // group_size)
    scales = (rng.random((out, n_groups)) * 2 + 0.05).astype(np.float16)
    qw = QuantizedWeight(out, inp, group_size, widths_arr, np.concatenate(codes), np.concatenate(books), scales)
    qw.validate()
    return qw


def buffers(qw: QuantizedWeight, device: str = "cpu") -> tuple:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return (
        t(qw.codes), t(qw.codebooks), t(qw.scales), t(qw.widths),
        t(qw.row_code_offsets), t(qw.row_level_offsets), qw.in_features, qw.group_size,
    )  # fmt: skip


def test_golden_vector_decodes_exactly() -> None:
    qw, expected = golden_weight()
    assert np.array_equal(qw.dequantize(), expected)  # the spec itself agrees with the hand computation
    got = torch.ops.lowra.dequantize(*buffers(qw))
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    assert np.array_equal(got.numpy(), expected)


# Mixed widths with every width present, odd in_features (row padding inside the last byte), and group sizes
# 0 (scale folded into the codebook), dividing, non-dividing, and larger than in_features.
CASES = [
    (6, 77, 0, [1, 2, 4, 4, 1, 2]),
    (5, 128, 64, [4, 1, 1, 2, 4]),
    (7, 77, 64, [2, 2, 1, 4, 1, 4, 2]),
    (4, 50, 7, [1, 4, 2, 1]),
    (3, 9, 64, [4, 2, 1]),
    (8, 33, 16, [2] * 8),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out,inp,group_size,widths", CASES)
def test_dequantize_equals_numpy_reference(device: str, out: int, inp: int, group_size: int, widths: list[int]) -> None:
    qw = random_weight(out, inp, group_size, widths, seed=out * 1000 + inp)
    got = torch.ops.lowra.dequantize(*buffers(qw, device)).cpu().numpy()
    assert np.array_equal(got, qw.dequantize())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_lowbit_linear_equals_dense_linear_and_its_gradient(device: str, with_bias: bool) -> None:
    qw = random_weight(7, 77, 64, [2, 2, 1, 4, 1, 4, 2])
    dense = torch.from_numpy(qw.dequantize()).to(device)
    torch.manual_seed(0)
    bias = torch.randn(7, device=device) if with_bias else None
    x = torch.randn(2, 3, 77, device=device, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    y = torch.ops.lowra.lowbit_linear(x, *buffers(qw, device), bias)
    y_dense = F.linear(x_dense, dense, bias)
    assert y.shape == (2, 3, 7)
    assert torch.equal(y, y_dense)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_dense.backward(grad)
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=0, atol=1e-6)
    # dX = dY @ W, checked independently of F.linear's backward.
    torch.testing.assert_close(x.grad, grad @ dense, rtol=0, atol=1e-6)


def test_bias_gradient_when_asked() -> None:
    qw = random_weight(4, 50, 7, [1, 4, 2, 1])
    bias = torch.zeros(4, requires_grad=True)
    x = torch.randn(5, 50)
    torch.ops.lowra.lowbit_linear(x, *buffers(qw), bias).sum().backward()
    assert torch.equal(bias.grad, torch.full((4,), 5.0))


def test_buffers_get_no_gradient_and_weight_is_not_saved() -> None:
    qw = random_weight(6, 77, 0, [1, 2, 4, 4, 1, 2])
    x = torch.randn(3, 77, requires_grad=True)
    y = torch.ops.lowra.lowbit_linear(x, *buffers(qw), None)
    # The autograd node keeps only the packed buffers: no saved float32 [out, in] tensor.
    saved = [t for t in y.grad_fn.saved_tensors if t.dtype == torch.float32]
    assert saved == []
    (grad_x,) = torch.autograd.grad(y.sum(), [x])
    assert grad_x.shape == (3, 77)


def test_half_precision_input_keeps_its_dtype() -> None:
    qw = random_weight(5, 128, 64, [4, 1, 1, 2, 4])
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    y = torch.ops.lowra.lowbit_linear(x, *buffers(qw), None)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x, torch.from_numpy(qw.dequantize()).to(torch.bfloat16))
    assert torch.equal(y, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out,inp,group_size,widths", [CASES[0], CASES[3]])
def test_opcheck_dequantize(device: str, out: int, inp: int, group_size: int, widths: list[int]) -> None:
    qw = random_weight(out, inp, group_size, widths)
    torch.library.opcheck(torch.ops.lowra.dequantize.default, buffers(qw, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_lowbit_linear(device: str, with_bias: bool) -> None:
    qw = random_weight(4, 50, 7, [1, 4, 2, 1])
    bias = torch.randn(4, device=device) if with_bias else None
    for shape, grad in (((3, 50), True), ((2, 3, 50), False), ((2, 1, 3, 50), True)):
        x = torch.randn(*shape, device=device, requires_grad=grad)
        torch.library.opcheck(torch.ops.lowra.lowbit_linear.default, (x, *buffers(qw, device), bias))


def test_meta_tensors_give_shapes_only() -> None:
    qw = random_weight(4, 50, 7, [1, 4, 2, 1])
    meta = buffers(qw, "meta")
    assert torch.ops.lowra.dequantize(*meta).shape == (4, 50)
    x = torch.empty(2, 9, 50, device="meta")
    assert torch.ops.lowra.lowbit_linear(x, *meta, None).shape == (2, 9, 4)


def _broken(qw: QuantizedWeight, index: int, value: object) -> tuple:
    args = list(buffers(qw))
    args[index] = value
    return tuple(args)


@pytest.mark.parametrize(
    "index,make,match",
    [
        (2, lambda qw: torch.zeros(4, 3, dtype=torch.float16), r"scales have shape \[4, 3\]; expected \[4, 8\]"),
        (2, lambda qw: torch.zeros(4, 8, dtype=torch.float32), r"scales is torch.float32"),
        (0, lambda qw: torch.zeros(10, dtype=torch.int32), r"codes is torch.int32"),
        (1, lambda qw: torch.zeros(2, 10, dtype=torch.float16), r"codebooks .* expected torch.float16 1-D"),
        (4, lambda qw: torch.zeros(3, dtype=torch.int64), r"row_code_offsets has 3 entries; expected .* = 5"),
        (3, lambda qw: torch.zeros(4, dtype=torch.int64), r"widths is torch.int64"),
        (6, lambda qw: 0, r"in_features=0"),
        (7, lambda qw: -1, r"group_size=-1"),
    ],
)
def test_bad_buffers_are_refused_with_what_was_expected(index: int, make, match: str) -> None:
    qw = random_weight(4, 50, 7, [1, 4, 2, 1])
    with pytest.raises(ConfigError, match=match):
        torch.ops.lowra.dequantize(*_broken(qw, index, make(qw)))


def test_bad_input_width_is_refused() -> None:
    qw = random_weight(4, 50, 7, [1, 4, 2, 1])
    with pytest.raises(ConfigError, match=r"input has shape \[3, 49\]; expected \[\.\.\., 50\]"):
        torch.ops.lowra.lowbit_linear(torch.randn(3, 49), *buffers(qw), None)
    with pytest.raises(ConfigError, match="floating-point"):
        torch.ops.lowra.lowbit_linear(torch.ones(3, 50, dtype=torch.int64), *buffers(qw), None)


def test_cuda_kernel_loader_is_optional() -> None:
    status = load()
    assert isinstance(status, KernelStatus)
    if not torch.cuda.is_available():
        assert not status and "CUDA is not available" in status.reason
    assert load() is status  # cached: one attempt per process


# ------------------------------------------------------------------------------------------------ quantize / grad
def numpy_encode(weight: np.ndarray, qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """lowra::quantize_codes written from its docstring with numpy, element by element in float32 (the spec)."""
    w = weight.astype(np.float32)
    out, inp, g = qw.out_features, qw.in_features, qw.group_size
    n_groups = 0 if g == 0 else -(-inp // g)
    scales = np.zeros((out, n_groups), np.float16)
    codes = np.zeros(int(qw.row_code_offsets[-1]), np.uint8)
    for r in range(out):
        width = int(qw.widths[r])
        levels = qw.codebooks[qw.row_level_offsets[r] : qw.row_level_offsets[r + 1]].astype(np.float32)
        mids = (levels[1:] + levels[:-1]) * np.float32(0.5)
        values = w[r].copy()
        for k in range(n_groups):
            part = slice(k * g, min((k + 1) * g, inp))
            scales[r, k] = np.float16(np.abs(w[r, part]).max())
            s = np.float32(scales[r, k])
            values[part] = 0 if s == 0 else w[r, part] / s
        row_codes = (mids[None, :] < values[:, None]).sum(1)
        packed = pack_codes(row_codes[None, :], width)[0]
        codes[qw.row_code_offsets[r] : qw.row_code_offsets[r + 1]] = packed
    return codes, scales


def encode_args(weight: torch.Tensor, qw: QuantizedWeight, device: str = "cpu") -> tuple:
    b = buffers(qw, device)
    return (weight.to(device), b[1], b[3], b[4], b[5], qw.group_size, int(qw.row_code_offsets[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out,inp,group_size,widths", CASES)
def test_quantize_codes_equals_numpy_spec(dtype: torch.dtype, out: int, inp: int, group_size: int, widths: list[int]) -> None:
    qw = random_weight(out, inp, group_size, widths, seed=inp)
    torch.manual_seed(inp)
    weight = (torch.randn(out, inp) * 1.3).to(dtype)
    weight[0, : min(group_size or inp, inp)] = 0  # an all-zero group: scale 0, values encode as 0
    codes, scales = torch.ops.lowra.quantize_codes(*encode_args(weight, qw))
    want_codes, want_scales = numpy_encode(weight.float().numpy(), qw)
    assert codes.dtype == torch.uint8 and np.array_equal(codes.numpy(), want_codes)
    assert scales.dtype == torch.float16 and np.array_equal(scales.numpy(), want_scales)


def test_quantize_codes_inverts_dequantize_without_groups() -> None:
    qw = random_weight(6, 77, 0, [1, 2, 4, 4, 1, 2])
    # Distinct levels per row (random ones can collide in float16, and then two codes decode alike).
    qw.codebooks = np.concatenate(
        [np.linspace(-1, 1, 1 << int(w)) * (r + 1) for r, w in enumerate(qw.widths)]
    ).astype(np.float16)
    decoded = torch.from_numpy(qw.dequantize())
    codes, scales = torch.ops.lowra.quantize_codes(*encode_args(decoded, qw))
    # Each value sits on a level, away from every midpoint: the codes come back exactly (padding bits zero).
    assert np.array_equal(codes.numpy(), qw.codes) and scales.shape == (6, 0)


def test_quantize_codes_refuses_wrong_byte_count() -> None:
    qw = random_weight(4, 50, 7, [1, 4, 2, 1])
    args = list(encode_args(torch.randn(4, 50), qw))
    args[-1] += 1
    with pytest.raises(ConfigError, match="n_code_bytes"):
        torch.ops.lowra.quantize_codes(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_quantize_codes_and_grad_input(device: str) -> None:
    qw = random_weight(4, 50, 7, [1, 4, 2, 1])
    torch.library.opcheck(torch.ops.lowra.quantize_codes.default, encode_args(torch.randn(4, 50), qw, device))
    grad_out = torch.randn(2, 3, 4, device=device)
    torch.library.opcheck(torch.ops.lowra.lowbit_linear_grad_input.default, (grad_out, *buffers(qw, device)))


def test_grad_input_op_is_grad_out_times_weight() -> None:
    qw = random_weight(5, 128, 64, [4, 1, 1, 2, 4])
    grad_out = torch.randn(3, 5)
    got = torch.ops.lowra.lowbit_linear_grad_input(grad_out, *buffers(qw))
    assert torch.equal(got, grad_out @ torch.from_numpy(qw.dequantize()))
    meta = torch.ops.lowra.lowbit_linear_grad_input(torch.empty(2, 7, 5, device="meta"), *buffers(qw, "meta"))
    assert meta.shape == (2, 7, 128)
