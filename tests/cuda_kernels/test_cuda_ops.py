"""CUDA kernels against the CPU references (run only where a GPU and a CUDA torch are present).

Stated tolerances: quantize_codes codes and scales bit-exact; float32 dequantize bit-exact; matmuls (GEMV, fused
WMMA, chunked cuBLAS) within ``max|y - y_ref| <= TOL[dtype] * max|y_ref|`` against a float64 product of the exact
decoded weight (float32 accumulation; float16/bfloat16 activations round the decoded weight to their dtype).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowra.cuda_kernels import load
from lowra.device_runtime.formats import pack_codes
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.quant import ops  # noqa: F401  (registers torch.ops.lowra.*)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and a CUDA build of torch"),
]

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    status = load()
    if not status:
        pytest.fail(f"CUDA is available but the kernels did not load: {status.reason}")


def make_weight(out: int, inp: int, group_size: int, widths: list[int] | None = None, seed: int = 0) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    w = np.asarray(widths if widths is not None else rng.choice([1, 2, 4], size=out, p=[0.5, 0.4, 0.1]), np.uint8)
    codes, books = [], []
    for width in w.tolist():
        codes.append(pack_codes(rng.integers(0, 1 << width, size=(1, inp)), width)[0])
        # Distinct ascending levels (random float16 ones could collide).
        books.append((np.linspace(-1, 1, 1 << width) * rng.uniform(0.01, 0.05)).astype(np.float16))
    n_groups = 0 if group_size == 0 else -(-inp // group_size)
    scales = (rng.random((out, n_groups)) * 2 + 0.05).astype(np.float16)
    qw = QuantizedWeight(out, inp, group_size, w, np.concatenate(codes), np.concatenate(books), scales)
    qw.validate()
    return qw


def buffers(qw: QuantizedWeight, device: str) -> tuple:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return (
        t(qw.codes), t(qw.codebooks), t(qw.scales), t(qw.widths),
        t(qw.row_code_offsets), t(qw.row_level_offsets), qw.in_features, qw.group_size,
    )  # fmt: skip


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


# in_features: aligned, odd (unaligned rows and tails), and wide enough for the GEMV's opt-in shared memory.
SHAPES = [(96, 256, 0), (70, 77, 0), (64, 200, 64), (33, 130, 7), (40, 12_000, 128)]


@pytest.mark.parametrize("out,inp,group_size", SHAPES)
def test_dequantize_bit_exact(out: int, inp: int, group_size: int) -> None:
    qw = make_weight(out, inp, group_size, seed=inp)
    got = torch.ops.lowra.dequantize(*buffers(qw, "cuda")).cpu().numpy()
    assert np.array_equal(got, qw.dequantize())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out,inp,group_size", SHAPES)
def test_quantize_codes_bit_exact(dtype: torch.dtype, out: int, inp: int, group_size: int) -> None:
    qw = make_weight(out, inp, group_size, seed=out)
    torch.manual_seed(out)
    weight = (torch.randn(out, inp) * 0.02).to(dtype)
    weight[1, : group_size or inp] = 0
    nbytes = int(qw.row_code_offsets[-1])
    b = buffers(qw, "cuda")
    codes, scales = torch.ops.lowra.quantize_codes(weight.cuda(), b[1], b[3], b[4], b[5], group_size, nbytes)
    cb = buffers(qw, "cpu")
    want_codes, want_scales = torch.ops.lowra.quantize_codes(weight, cb[1], cb[3], cb[4], cb[5], group_size, nbytes)
    assert torch.equal(codes.cpu(), want_codes)
    assert torch.equal(scales.cpu(), want_scales)


@pytest.mark.parametrize("strategy", ["auto", "fused", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 130])
@pytest.mark.parametrize("out,inp,group_size", SHAPES)
def test_lowbit_linear_and_input_gradient(
    monkeypatch: pytest.MonkeyPatch, strategy: str, dtype: torch.dtype, m: int, out: int, inp: int, group_size: int
) -> None:
    monkeypatch.setenv("LOWRA_CUDA_MATMUL", strategy)
    qw = make_weight(out, inp, group_size, seed=m + inp)
    weight = torch.from_numpy(qw.dequantize()).double().cuda()
    torch.manual_seed(m)
    x = torch.randn(m, inp, device="cuda").to(dtype).requires_grad_(True)
    bias = torch.randn(out, device="cuda")
    y = torch.ops.lowra.lowbit_linear(x, *buffers(qw, "cuda"), bias)
    assert y.dtype == dtype and y.shape == (m, out)
    want = x.detach().double() @ weight.T + bias.to(dtype).double()
    assert relative_error(y, want) <= TOL[dtype], (strategy, dtype, m)
    grad = torch.randn(m, out, device="cuda").to(dtype)
    (grad_x,) = torch.autograd.grad(y, [x], grad)
    assert grad_x.dtype == dtype and grad_x.shape == x.shape
    assert relative_error(grad_x, grad.double() @ weight) <= TOL[dtype], (strategy, dtype, m)


def test_unknown_matmul_strategy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWRA_CUDA_MATMUL", "fastest")
    qw = make_weight(8, 64, 0)
    x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="'auto' \\(default\\), 'fused' or 'chunked'"):
        torch.ops.lowra.lowbit_linear(x, *buffers(qw, "cuda"), None)


def test_batched_input_keeps_leading_dims() -> None:
    qw = make_weight(48, 256, 0)
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.bfloat16)
    assert torch.ops.lowra.lowbit_linear(x, *buffers(qw, "cuda"), None).shape == (2, 3, 48)


@pytest.mark.parametrize("out,inp,group_size", [SHAPES[1], SHAPES[3]])
def test_opcheck_on_cuda(out: int, inp: int, group_size: int) -> None:
    qw = make_weight(out, inp, group_size)
    b = buffers(qw, "cuda")
    torch.library.opcheck(torch.ops.lowra.dequantize.default, b)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, inp, device="cuda", dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.lowra.lowbit_linear.default, (x, *b, None))
        grad_out = torch.randn(3, out, device="cuda", dtype=dtype)
        torch.library.opcheck(torch.ops.lowra.lowbit_linear_grad_input.default, (grad_out, *b))
    weight = torch.randn(out, inp, device="cuda")
    args = (weight, b[1], b[3], b[4], b[5], group_size, int(qw.row_code_offsets[-1]))
    torch.library.opcheck(torch.ops.lowra.quantize_codes.default, args)


def test_mapping_on_cuda_matches_cpu_quality() -> None:
    """The batched Lloyd-Max fit on the GPU lands where the CPU one does (chunking may move a row's last iterations)."""
    from lowra.sdk.quant.base.fit import quantize_weight

    torch.manual_seed(0)
    weight = torch.randn(300, 512) * torch.exp(0.3 * torch.randn(300, 512)) * 0.02
    widths = np.array([1, 2, 4] * 100)
    errors = {}
    for device in ("cpu", "cuda"):
        qw = quantize_weight(weight, widths, device=device)
        errors[device] = float(((torch.from_numpy(qw.dequantize()) - weight) ** 2).sum())
    assert abs(errors["cuda"] - errors["cpu"]) <= 0.01 * errors["cpu"], errors
