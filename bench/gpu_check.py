"""Device check of lowra's CUDA kernels and GPU mapping: build, correctness, then LLaMA-2-7B-shaped measurements.

One command on a machine with one GPU (no network, no model files needed; every weight is random)::

    python bench/gpu_check.py            # full (~5-8 min on an H200); --quick for a ~2 min pass

Smoke test of the script itself on a CPU-only machine (no kernels; tiny shapes)::

    python bench/gpu_check.py --device cpu --quick --out /tmp/gpu_check

Sections (each runs in its own try/except: an error is printed and recorded, the next section still runs):
1. build      lowra.cuda_kernels.load(): nvcc build for this GPU (cached under $LOWRA_CACHE/cuda_kernels, default ~/.cache/lowra).
2. correctness quantize_codes codes/scales and float32 dequantize bit-exact vs the CPU reference; GEMV, fused and
              chunked matmul + input gradient within TOL of a float64 product.
3. dequantize 11008x4096 at 1.5 average code bits -> float32; bytes moved per second as a fraction of a measured
              device-to-device copy (target >= 0.70).
4. gemv       batch 1, 11008x4096 at 1.5 bits vs torch bf16 F.linear (target >= 5x), eager and CUDA-graph replay,
              cycling through weight copies larger than L2.
4b. gemm      the same layer at 512 tokens: forward and input gradient, fused vs chunked vs bf16 (per-layer view).
5. train      one LoRA step (rank 16, batch 1x512, AdamW) on a 7B-shaped stack (32 blocks of q/k/v/o 4096x4096,
              gate/up 11008x4096, down 4096x11008 + causal SDPA) low-bit (fused and chunked strategies) vs bf16
              (target overhead <= 5%); peak memory of each.
6. mapping    plan_model(device="cuda") scoring + precision assignment + refit on 7B-shaped layers with random
              heavy-tailed weights (target <= 60 s for the whole model): a few blocks measured, the rest
              extrapolated linearly in rows (said so in the output); the assignment is timed on the full row count.

Results: printed, and written as gpu_check.json + gpu_check.md under --out, $OUT if set, else docs/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from lowra.cuda_kernels import load  # noqa: E402
from lowra.device_runtime.formats import pack_codes  # noqa: E402
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight  # noqa: E402
from lowra.sdk.quant import ops  # noqa: E402,F401  (registers torch.ops.lowra.*)
from lowra.sdk.quant.lowbit_linear import LowBitLinear  # noqa: E402

# LLaMA-2-7B: hidden 4096, MLP 11008, 32 blocks, 7 linears per block.
HIDDEN, MLP, BLOCKS = 4096, 11008, 32
BLOCK_SHAPES = [("q_proj", HIDDEN, HIDDEN), ("k_proj", HIDDEN, HIDDEN), ("v_proj", HIDDEN, HIDDEN),
                ("o_proj", HIDDEN, HIDDEN), ("gate_proj", MLP, HIDDEN), ("up_proj", MLP, HIDDEN),
                ("down_proj", HIDDEN, MLP)]
# Row widths drawn with these probabilities average 1.5 code bits (0.55 + 0.7 + 0.25), LowRA's headline budget.
WIDTH_MIX = {1: 0.55, 2: 0.35, 4: 0.0625}
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
TARGETS = {"dequantize_fraction_of_copy": 0.70, "gemv_speedup_vs_bf16": 5.0, "train_overhead": 0.05,
           "mapping_seconds": 60.0}


def _normalize_mix() -> dict[int, float]:
    total = sum(WIDTH_MIX.values())
    return {w: p / total for w, p in WIDTH_MIX.items()}


# ------------------------------------------------------------------------------------------------ helpers
class Clock:
    """Wall-clock budget for the whole run: sections ask before starting something long."""

    def __init__(self, budget_s: float):
        self.start, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Seconds per call, averaged over ``iters`` back-to-back calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def graph_timed(fn: Callable[[], Any], device: torch.device, iters: int) -> float | None:
    """Seconds per call with ``iters`` calls captured in one CUDA graph (no Python/dispatch overhead); None on CPU."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def random_widths(out: int, generator: torch.Generator) -> torch.Tensor:
    mix = _normalize_mix()
    probs = torch.tensor([mix[1], mix[2], mix[4]])
    index = torch.multinomial(probs, out, replacement=True, generator=generator)
    return torch.tensor([1, 2, 4], dtype=torch.uint8)[index]


def random_lowbit(out: int, inp: int, device: torch.device, seed: int, group_size: int = 0) -> LowBitLinear:
    """A LowBitLinear with random codes, ascending random codebooks and the 1.5-bit width mix, built on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    widths = random_widths(out, gen)
    w = widths.long()
    code_bytes = int(((inp * w + 7) // 8).sum())
    levels = int((1 << w).sum())
    # The codes are most of the bytes (1.3 GB for a 7B stack): drawn on the device itself.
    device_gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 256, (code_bytes,), generator=device_gen, dtype=torch.uint8, device=device)
    # Per-row levels ~ sorted Gaussian quantiles times a row scale near LLaMA's weight std (0.02).
    raw = torch.randn(levels, generator=gen) * 0.02
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(1 << w, 0)])
    books = torch.empty(levels)
    for width in (1, 2, 4):
        rows = torch.nonzero(widths == width).flatten()
        if rows.numel():
            index = offsets[rows].unsqueeze(1) + torch.arange(1 << width)
            books[index.flatten()] = torch.sort(raw[index], dim=1).values.flatten()
    n_groups = 0 if group_size == 0 else -(-inp // group_size)
    scales = (torch.rand(out, n_groups, generator=gen) + 0.5).half()
    return LowBitLinear(in_features=inp, group_size=group_size, codes=codes, codebooks=books.half().to(device),
                        scales=scales.to(device), widths=widths.to(device))


def numpy_weight(out: int, inp: int, group_size: int, seed: int) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    mix = _normalize_mix()
    widths = rng.choice([1, 2, 4], size=out, p=[mix[1], mix[2], mix[4]]).astype(np.uint8)
    codes, books = [], []
    for width in widths.tolist():
        codes.append(pack_codes(rng.integers(0, 1 << width, size=(1, inp)), width)[0])
        books.append((np.linspace(-1, 1, 1 << width) * rng.uniform(0.01, 0.05)).astype(np.float16))
    n_groups = 0 if group_size == 0 else -(-inp // group_size)
    scales = (rng.random((out, n_groups)) * 2 + 0.05).astype(np.float16)
    qw = QuantizedWeight(out, inp, group_size, widths, np.concatenate(codes), np.concatenate(books), scales)
    qw.validate()
    return qw


def buffers(qw: QuantizedWeight, device: torch.device) -> tuple:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return (t(qw.codes), t(qw.codebooks), t(qw.scales), t(qw.widths), t(qw.row_code_offsets),
            t(qw.row_level_offsets), qw.in_features, qw.group_size)


def heavy_tailed(out: int, inp: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Roughly LLaMA-like weights: Gaussian scale mixture (heavier tails than normal), per-row scale spread."""
    w = torch.randn(out, inp, device=device, generator=gen)
    w *= torch.exp(0.35 * torch.randn(out, inp, device=device, generator=gen))
    w *= 0.02 * torch.exp(0.25 * torch.randn(out, 1, device=device, generator=gen))
    return w.to(dtype)


def set_matmul_strategy(name: str) -> None:
    os.environ["LOWRA_CUDA_MATMUL"] = name


# ------------------------------------------------------------------------------------------------ sections
def section_build(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    status = load()
    info = {"loaded": bool(status), "reason": status.reason, "seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    print(f"  kernels loaded: {bool(status)} ({status.reason}) in {info['seconds']} s")
    if device.type == "cuda" and not status:
        print("  !! CUDA present but kernels did not load: every measurement below is of the pure-torch reference")
    return info


def section_correctness(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    shapes = [(96, 256, 0), (70, 77, 0), (64, 200, 64), (33, 130, 7), (40, 12_000, 128)]
    if args.quick:
        shapes = shapes[:4]
    failures: list[str] = []
    checked = 0
    worst: dict[str, float] = {}
    for out, inp, group_size in shapes:
        qw = numpy_weight(out, inp, group_size, seed=out + inp)
        b = buffers(qw, device)
        got = torch.ops.lowra.dequantize(*b).cpu().numpy()
        checked += 1
        if not np.array_equal(got, qw.dequantize()):
            failures.append(f"dequantize {out}x{inp} g{group_size}: not bit-exact")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            weight = (torch.randn(out, inp) * 0.02).to(dtype)
            weight[1, : group_size or inp] = 0
            n = int(qw.row_code_offsets[-1])
            codes, scales = torch.ops.lowra.quantize_codes(weight.to(device), b[1], b[3], b[4], b[5], group_size, n)
            cb = buffers(qw, torch.device("cpu"))
            want_codes, want_scales = torch.ops.lowra.quantize_codes(weight, cb[1], cb[3], cb[4], cb[5], group_size, n)
            checked += 1
            if not (torch.equal(codes.cpu(), want_codes) and torch.equal(scales.cpu(), want_scales)):
                mismatched = int((codes.cpu() != want_codes).sum())
                failures.append(f"quantize_codes {out}x{inp} g{group_size} {dtype}: {mismatched} code bytes differ")
        dense = torch.from_numpy(qw.dequantize()).double().to(device)
        for strategy in ("fused", "chunked"):
            set_matmul_strategy(strategy)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for m in (1, 5, 130):
                    x = torch.randn(m, inp, device=device).to(dtype).requires_grad_(True)
                    bias = torch.randn(out, device=device)
                    y = torch.ops.lowra.lowbit_linear(x, *b, bias)
                    want = x.detach().double() @ dense.T + bias.to(dtype).double()
                    grad = torch.randn(m, out, device=device).to(dtype)
                    (gx,) = torch.autograd.grad(y, [x], grad)
                    for name, value, ref in (("forward", y.detach(), want), ("grad_input", gx, grad.double() @ dense)):
                        err = float((value.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                        key = f"{name}/{strategy}/{str(dtype).split('.')[-1]}"
                        worst[key] = max(worst.get(key, 0.0), err)
                        checked += 1
                        if not math.isfinite(err) or err > TOL[dtype]:
                            failures.append(f"{key} m={m} {out}x{inp} g{group_size}: rel err {err:.2e} > {TOL[dtype]}")
    set_matmul_strategy("fused")
    print(f"  {checked} checks, {len(failures)} failures")
    for line in failures[:20]:
        print(f"  FAIL {line}")
    for key, err in sorted(worst.items()):
        print(f"  worst rel err {key:32s} {err:.2e} (tol {TOL[getattr(torch, key.split('/')[-1])]:.0e})")
    return {"checks": checked, "failures": failures, "worst_relative_error": worst,
            "tolerances": {str(k).split(".")[-1]: v for k, v in TOL.items()}}


def section_dequantize(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    out, inp = (MLP, HIDDEN) if not (args.quick and device.type == "cpu") else (512, 1024)
    layer = random_lowbit(out, inp, device, seed=1)
    iters = 50 if device.type == "cuda" else 3
    seconds = timed(layer.dequantize, device, iters)
    moved = layer.codes.numel() + 2 * layer.codebooks.numel() + 4 * out * inp  # read codes + books, write fp32
    copy_src = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else \
        torch.empty(16 << 20, dtype=torch.uint8)
    copy_dst = torch.empty_like(copy_src)
    copy_s = timed(lambda: copy_dst.copy_(copy_src), device, iters)
    copy_bw = 2 * copy_src.numel() / copy_s
    bw = moved / seconds
    mean_bits = float(layer.widths.float().mean())
    result = {"shape": [out, inp], "mean_code_bits": round(mean_bits, 3), "seconds": seconds,
              "bytes_per_s": bw, "copy_bytes_per_s": copy_bw, "fraction_of_copy": bw / copy_bw,
              "target": TARGETS["dequantize_fraction_of_copy"]}
    print(f"  {out}x{inp} at {mean_bits:.2f} bits -> fp32: {seconds * 1e6:.1f} us, {bw / 1e9:.0f} GB/s; "
          f"copy {copy_bw / 1e9:.0f} GB/s; fraction {bw / copy_bw:.2f} (target >= {TARGETS['dequantize_fraction_of_copy']})")
    return result


class RoundRobin:
    """Calls ``fn(item)`` over ``items`` in turn: the weights together exceed L2, so every call streams from HBM
    as in generation (32 blocks x 7 layers cycle), instead of re-reading one L2-resident 8 MB layer."""

    def __init__(self, fn: Callable[[Any], Any], items: list[Any]):
        self.fn, self.items, self.index = fn, items, 0

    def __call__(self) -> Any:
        item = self.items[self.index]
        self.index = (self.index + 1) % len(self.items)
        return self.fn(item)


def section_gemv(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    out, inp = (MLP, HIDDEN) if not (args.quick and device.type == "cpu") else (512, 1024)
    # ~200 MB of low-bit weights and ~360 MB of bf16 ones: several times an H200's 50 MB L2.
    n_low, n_dense = (24, 4) if device.type == "cuda" else (2, 2)
    layers = [random_lowbit(out, inp, device, seed=2 + i) for i in range(n_low)]
    dense = [torch.randn(out, inp, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(n_dense)]
    x = torch.randn(1, inp, device=device, dtype=torch.bfloat16)
    set_matmul_strategy("fused")
    iters = 240 if device.type == "cuda" else 3
    with torch.no_grad():
        low = timed(RoundRobin(lambda layer: layer(x), layers), device, iters)
        ref = timed(RoundRobin(lambda w: F.linear(x, w), dense), device, iters)
        low_graph = graph_timed(RoundRobin(lambda layer: layer(x), layers), device, 96)
        ref_graph = graph_timed(RoundRobin(lambda w: F.linear(x, w), dense), device, 96)
    mean_bits = float(torch.cat([layer.widths for layer in layers]).float().mean())
    result = {"shape": [out, inp], "mean_code_bits": round(mean_bits, 3), "weight_copies": [n_low, n_dense],
              "lowbit_eager_s": low, "bf16_eager_s": ref, "speedup_eager": ref / low,
              "lowbit_graph_s": low_graph, "bf16_graph_s": ref_graph,
              "speedup_graph": None if low_graph is None else ref_graph / low_graph,
              "target": TARGETS["gemv_speedup_vs_bf16"]}
    print(f"  {out}x{inp} at {mean_bits:.2f} bits, {n_low} low-bit / {n_dense} bf16 weight copies in turn (beyond L2)")
    print(f"  eager: low-bit {low * 1e6:.1f} us vs bf16 {ref * 1e6:.1f} us -> {ref / low:.2f}x "
          f"(includes Python + dispatch per call)")
    if low_graph is not None:
        print(f"  CUDA graph (kernel time): low-bit {low_graph * 1e6:.2f} us vs bf16 {ref_graph * 1e6:.2f} us -> "
              f"{ref_graph / low_graph:.2f}x (target >= {TARGETS['gemv_speedup_vs_bf16']})")
    return result


def section_gemm(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """One 11008x4096 layer at 512 tokens: forward and input gradient, fused vs chunked vs bf16 cuBLAS (kernel level,
    the per-layer view of the training-step overhead)."""
    out, inp, m = (MLP, HIDDEN, 512) if device.type == "cuda" else (256, 512, 16)
    layer = random_lowbit(out, inp, device, seed=5)
    dense = torch.randn(out, inp, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, inp, device=device, dtype=torch.bfloat16)
    grad = torch.randn(m, out, device=device, dtype=torch.bfloat16)
    buffers_ = (layer.codes, layer.codebooks, layer.scales, layer.widths, layer.row_code_offsets,
                layer.row_level_offsets, layer.in_features, layer.group_size)
    iters = 50 if device.type == "cuda" else 2
    result: dict[str, Any] = {"shape": [m, out, inp]}
    with torch.no_grad():
        result["bf16_forward_s"] = timed(lambda: F.linear(x, dense), device, iters)
        result["bf16_grad_input_s"] = timed(lambda: grad @ dense, device, iters)
        for strategy in ("fused", "chunked"):
            set_matmul_strategy(strategy)
            result[f"{strategy}_forward_s"] = timed(lambda: torch.ops.lowra.lowbit_linear(x, *buffers_, None), device, iters)
            result[f"{strategy}_grad_input_s"] = timed(
                lambda: torch.ops.lowra.lowbit_linear_grad_input(grad, *buffers_), device, iters)
    set_matmul_strategy("fused")
    flops = 2 * m * out * inp
    for key in [k for k in result if k.endswith("_s")]:
        result[key.replace("_s", "_tflops")] = flops / result[key] / 1e12
    for direction in ("forward", "grad_input"):
        ref = result[f"bf16_{direction}_s"]
        print(f"  {direction:10s} bf16 {ref * 1e6:8.1f} us ({flops / ref / 1e12:6.1f} TFLOP/s) | " + " | ".join(
            f"{st} {result[f'{st}_{direction}_s'] * 1e6:8.1f} us ({result[f'{st}_{direction}_s'] / ref:5.2f}x bf16)"
            for st in ("fused", "chunked")))
    return result


class LoraOver(nn.Module):
    """``base(x) + scale * (x A^T) B^T`` with the base frozen (bf16 nn.Linear or LowBitLinear)."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int, device: torch.device):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, in_features, device=device, dtype=torch.bfloat16) / rank)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=torch.bfloat16))
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


class Block(nn.Module):
    """A LLaMA block's compute: RMS norm, q/k/v, causal SDPA over 32 heads, o, SwiGLU MLP, residuals."""

    def __init__(self, layers: dict[str, nn.Module], hidden: int):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.hidden = hidden

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = h.shape
        x = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
        heads = lambda t: t.view(batch, seq, 32, self.hidden // 32).transpose(1, 2)  # noqa: E731
        q, k, v = (heads(self.layers[n](x)) for n in ("q_proj", "k_proj", "v_proj"))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, self.hidden)
        h = h + self.layers["o_proj"](attn)
        x = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
        return h + self.layers["down_proj"](F.silu(self.layers["gate_proj"](x)) * self.layers["up_proj"](x))


def build_stack(kind: str, blocks: int, device: torch.device, rank: int, dim_scale: int = 1) -> nn.Module:
    """``dim_scale`` > 1 shrinks every dimension (the CPU smoke run only)."""
    gen = torch.Generator(device=device).manual_seed(0)
    stack = []
    for b in range(blocks):
        layers: dict[str, nn.Module] = {}
        for i, (name, out, inp) in enumerate(BLOCK_SHAPES):
            out, inp = out // dim_scale, inp // dim_scale
            if kind == "bf16":
                base = nn.Linear(inp, out, bias=False, device=device, dtype=torch.bfloat16)
                with torch.no_grad():
                    base.weight.copy_(torch.randn(out, inp, device=device, generator=gen, dtype=torch.bfloat16) * 0.02)
                base.weight.requires_grad_(False)
            else:
                base = random_lowbit(out, inp, device, seed=1000 * b + i)
            layers[name] = LoraOver(base, inp, out, rank, device)
        stack.append(Block(layers, HIDDEN // dim_scale))
    return nn.Sequential(*stack)


def section_train(device: torch.device, args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    blocks = BLOCKS if not args.quick else 4
    seq = 512 if device.type == "cuda" else 32
    dim_scale = 1
    if device.type == "cpu":
        blocks, dim_scale = 1, 16  # smoke run of the code path only: tiny layers, numbers meaningless
    steps, warmup = (5, 2) if device.type == "cuda" else (1, 1)
    results: dict[str, Any] = {"blocks_measured": blocks, "blocks_in_model": BLOCKS, "batch": [1, seq],
                               "lora_rank": 16, "target_overhead": TARGETS["train_overhead"]}
    # The low-bit stack is built once and timed under both matmul strategies (LOWRA_CUDA_MATMUL is read per call).
    runs = [("bf16", ("fused",)), ("lowbit", ("fused", "chunked"))]
    for kind, strategies in runs:
        if clock.left() < 60:
            for strategy in strategies:
                label = kind if kind == "bf16" else f"lowbit_{strategy}"
                results[label] = {"skipped": f"only {clock.left():.0f} s left of the run's budget"}
                print(f"  {label}: skipped (time budget)")
            continue
        model = optimizer = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            model = build_stack(kind, blocks, device, rank=16, dim_scale=dim_scale)
            build_s = time.perf_counter() - t0
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            x = torch.randn(1, seq, HIDDEN // dim_scale, device=device, dtype=torch.bfloat16)
            weight_bytes = sum(b.numel() * b.element_size() for b in model.buffers()) + sum(
                p.numel() * p.element_size() for p in model.parameters())

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                loss = model(x).float().pow(2).mean()
                loss.backward()
                optimizer.step()
        except Exception as exc:  # noqa: BLE001  (a failed variant must not hide the others)
            for strategy in strategies:
                label = kind if kind == "bf16" else f"lowbit_{strategy}"
                results[label] = {"error": f"building the stack: {type(exc).__name__}: {exc}"}
            print(f"  {kind}: ERROR building the stack: {type(exc).__name__}: {exc}")
            del model, optimizer
            continue
        for strategy in strategies:
            label = kind if kind == "bf16" else f"lowbit_{strategy}"
            try:
                set_matmul_strategy(strategy)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = timed(step, device, steps, warmup=warmup)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
                results[label] = {"step_s": seconds, "step_s_full_model_estimate": seconds * BLOCKS / blocks,
                                  "weight_and_lora_bytes": weight_bytes, "peak_bytes": peak,
                                  "build_s": build_s}
                print(f"  {label:15s} {seconds * 1e3:8.1f} ms/step for {blocks} blocks "
                      f"(x{BLOCKS / blocks:.0f} -> {seconds * BLOCKS / blocks:.2f} s for 32), "
                      f"weights+LoRA {weight_bytes / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB")
            except Exception as exc:  # noqa: BLE001
                results[label] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {label}: ERROR {type(exc).__name__}: {exc}")
        del model, optimizer, params, step
    set_matmul_strategy("fused")
    ref = results.get("bf16", {}).get("step_s")
    for label in ("lowbit_fused", "lowbit_chunked"):
        got = results.get(label, {}).get("step_s")
        if ref and got:
            results[label]["overhead_vs_bf16"] = got / ref - 1
            print(f"  {label}: overhead vs bf16 {100 * (got / ref - 1):+.1f}% (target <= "
                  f"{100 * TARGETS['train_overhead']:.0f}%)")
    if blocks != BLOCKS:
        print(f"  NOTE: {blocks} of {BLOCKS} blocks measured; full-model times are x{BLOCKS / blocks:.0f} extrapolations")
    return results


def section_mapping(device: torch.device, args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    from lowra.sdk.quant.allocation import assign_precision
    from lowra.sdk.quant.base.config import QuantizeConfig
    from lowra.sdk.quant.base.plan import plan_model, refine, row_costs

    blocks = 2 if args.quick else 4
    dim_scale = 1 if device.type == "cuda" else 16  # CPU smoke: 16x smaller layers
    if device.type == "cpu":
        blocks = 1
    gen = torch.Generator(device=device).manual_seed(3)
    model = nn.Module()
    for b in range(blocks):
        block = nn.Module()
        for name, out, inp in BLOCK_SHAPES:
            linear = nn.Linear(inp // dim_scale, out // dim_scale, bias=False, device="meta")
            linear.weight = nn.Parameter(heavy_tailed(out // dim_scale, inp // dim_scale, device, torch.bfloat16, gen),
                                         requires_grad=False)
            block.add_module(name, linear)
        model.add_module(f"block{b}", block)
    config = QuantizeConfig(bits=1.5, calibration=None)
    sync(device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = plan_model(model, config, progress=False, device=device, timings=timings)
    sync(device)
    scoring = time.perf_counter() - t0
    created = "2000-01-01T00:00:00+00:00"
    t0 = time.perf_counter()
    widths = plan.assign(1.5, created)
    assign_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    refine(plan, widths, progress=False)
    sync(device)
    refit = time.perf_counter() - t0
    rows_measured = sum(o for o, _ in plan.shapes)
    rows_full = BLOCKS * sum(out for _, out, _ in BLOCK_SHAPES)
    factor = rows_full / rows_measured if dim_scale == 1 else float("nan")
    # The knapsack is not linear in rows (per-row hulls in Python + one global sort): time it on the full row count
    # with synthetic distortions of the measured shape instead of extrapolating.
    full_assign_s = None
    if dim_scale == 1 and clock.left() > 90:
        costs = np.concatenate([np.broadcast_to(row_costs(inp), (out * BLOCKS, 3)) for _, out, inp in BLOCK_SHAPES])
        rng = np.random.default_rng(0)
        base = rng.lognormal(0, 0.5, len(costs))
        dist = np.stack([base, base * rng.uniform(0.25, 0.4, len(costs)), base * rng.uniform(0.015, 0.03, len(costs))], 1)
        t0 = time.perf_counter()
        assign_precision(costs, dist, costs[:, 0].sum() * 1.4)
        full_assign_s = time.perf_counter() - t0
    full_estimate = (scoring + refit) * factor + (full_assign_s if full_assign_s is not None else assign_s * factor)
    result = {"blocks_measured": blocks, "rows_measured": rows_measured, "rows_full_model": rows_full,
              "scoring_s": scoring, "assignment_s": assign_s, "refit_s": refit,
              "assignment_full_rows_s": full_assign_s, "full_model_estimate_s": full_estimate,
              "widths": {str(w): int((widths == w).sum()) for w in (1, 2, 4)},
              "target_s": TARGETS["mapping_seconds"], "device": str(device)}
    print(f"  {blocks} blocks ({rows_measured} rows): scoring {scoring:.1f} s, assignment {assign_s:.2f} s, "
          f"refit {refit:.1f} s")
    if full_assign_s is not None:
        print(f"  assignment on the full {rows_full} rows (synthetic distortions): {full_assign_s:.1f} s (CPU, Python)")
    if dim_scale == 1:
        print(f"  full LLaMA-2-7B estimate: {full_estimate:.0f} s = (scoring + refit) x{factor:.1f} (linear in rows, "
              f"extrapolated) + full-size assignment (target <= {TARGETS['mapping_seconds']:.0f} s)")
    return result


# ------------------------------------------------------------------------------------------------ report
def write_report(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# lowra GPU check ({results['meta']['when']})", "",
             f"device: {results['meta']['device']}; torch {torch.__version__}; quick={results['meta']['quick']}; "
             f"total {results['meta']['total_s']:.0f} s", ""]
    for name, value in results.items():
        if name == "meta":
            continue
        lines += [f"## {name}", "", "```", json.dumps(value, indent=2, default=str)[:6000], "```", ""]
    (out_dir / "gpu_check.md").write_text("\n".join(lines))
    print(f"\nwrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes/blocks (about 2 minutes on a GPU)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip long sections past this wall time")
    parser.add_argument("--out", default=None, help="report folder (default: $OUT, else docs/)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    clock = Clock(args.budget_s)
    torch.manual_seed(0)
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("build", lambda: section_build(device, args)),
        ("correctness", lambda: section_correctness(device, args)),
        ("dequantize", lambda: section_dequantize(device, args)),
        ("gemv", lambda: section_gemv(device, args)),
        ("gemm", lambda: section_gemm(device, args)),
        ("train", lambda: section_train(device, args, clock)),
        ("mapping", lambda: section_mapping(device, args, clock)),
    ]
    only = set(args.only.split(",")) if args.only else None
    results: dict[str, Any] = {}
    for name, run in sections:
        if only is not None and name not in only:
            continue
        print(f"\n== {name} (t={clock.elapsed():.0f} s)")
        try:
            results[name] = run()
        except Exception as exc:  # noqa: BLE001  (report and continue: one broken section must not hide the rest)
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  ERROR in {name}: {type(exc).__name__}: {exc}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["meta"] = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": str(device),
                       "quick": args.quick, "total_s": clock.elapsed(), "targets": TARGETS,
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "docs")
    write_report(results, out_dir)
    print(f"total {clock.elapsed():.0f} s")
    failed = [n for n, r in results.items() if isinstance(r, dict) and (r.get("error") or r.get("failures"))]
    if failed:
        print(f"sections with errors or failures: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
