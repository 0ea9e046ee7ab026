"""lowra's low-bit CPU kernels (lowra.device_runtime.native_kernels) vs numpy, on SmolLM2-135M's linear shapes.

One token (GEMV): the kernel straight from the packed rows, vs numpy float32 matvec with W already dequantized (the
memory-hungry baseline: 4 bytes per weight resident), vs numpy dequantize-then-matvec (what a numpy runtime pays to
keep memory at the packed size). Threads 1 and 2 (numpy's OpenBLAS is set to the same count). Prefill (GEMM, 27
tokens) is shown beside it. Every configuration is timed in rotated order, several rounds, median; ratios come
from the same run. Reports GB/s of packed weights read and the implied time of all 210 linears of one token
(30 blocks x q, k, v, o, gate, up, down). Layers are synthetic (random codes; speed does not depend on values)
at 4 bits, 2 bits and a 1/2/4 mix of about 2 bits, plus the real quantized base when one is cached.

The CPU may be shared: the load average is printed before and after; compare ratios, not absolute times.
Usage: python bench/bench_lowbit_gemv.py [--rounds 5] [--min-time 0.02]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from lowra.device_runtime._files import cache_dir
from lowra.device_runtime.formats.quantized_base import read_quantized_base
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.device_runtime.native_kernels import PackedLinear, isa_available

# SmolLM2-135M: (out, in) -> how many of the 210 linears of one token have that shape.
SHAPES = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30}
SHAPE_NAMES = {(576, 576): "q,o", (192, 576): "k,v", (1536, 576): "gate,up", (576, 1536): "down"}
MIXES = {  # name -> (fraction of rows per width, group size)
    "4-bit": ({4: 1.0}, 0),
    "2-bit": ({2: 1.0}, 0),
    "1/2/4 mix ~2.0-bit": ({1: 0.4, 2: 0.4, 4: 0.2}, 0),
    "2-bit, groups of 64": ({2: 1.0}, 64),
}
PROMPT_TOKENS = 27


def synthetic_weight(out: int, inputs: int, fractions: dict[int, float], group: int, seed: int) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    widths = rng.choice(list(fractions), size=out, p=list(fractions.values())).astype(np.uint8)
    n_bytes = int(((inputs * widths.astype(np.int64) + 7) // 8).sum())
    books = np.concatenate([np.sort(rng.standard_normal(1 << int(w)).astype(np.float16)) for w in widths])
    n_groups = -(-inputs // group) if group else 0
    return QuantizedWeight(out, inputs, group, widths, rng.integers(0, 256, n_bytes, dtype=np.uint8), books,
                           rng.uniform(0.5, 1.5, (out, n_groups)).astype(np.float16))  # fmt: skip


def real_layers() -> tuple[str, dict[tuple[int, int], QuantizedWeight]] | None:
    """One layer per shape from the first cached quantized base (sdk.quant.base.cache writes them here)."""
    files = sorted(cache_dir("quantized").glob("*.safetensors"))
    if not files:
        return None
    base = read_quantized_base(files[0], verify_checksum=False)
    layers: dict[tuple[int, int], QuantizedWeight] = {}
    for weight in base.layers.values():
        layers.setdefault((weight.out_features, weight.in_features), weight)
    bits = 8 * sum(w.codes.nbytes for w in base.layers.values()) / base.n_quantized_params
    return f"cached base {files[0].name} ({bits:.2f} code bits)", {s: layers[s] for s in SHAPES if s in layers}


def blas_threads_setter() -> Callable[[int], None]:
    """Set numpy's OpenBLAS thread count in-process (its library is already loaded by numpy)."""
    for path in glob.glob(str(Path(np.__file__).parent.parent / "numpy.libs" / "libscipy_openblas*.so")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):
                return getattr(lib, name)
    print("note: numpy's BLAS thread count cannot be set here; numpy runs with its default")
    return lambda n: None


def time_all(configs: dict[str, Callable[[], object]], rounds: int, min_time: float,
             before: dict[str, Callable[[], None]]) -> dict[str, float]:  # fmt: skip
    """Median seconds per call of each config; configs run in rotated order every round."""
    reps = {}
    for name, fn in configs.items():
        before[name]()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < min_time / 4:
            fn()
            n += 1
        reps[name] = max(1, int(n * 4 * min_time / (time.perf_counter() - start) / 4))
    samples: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            before[name]()
            fn = configs[name]
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def layer_configs(weight: QuantizedWeight, packed: PackedLinear, dense: np.ndarray, x: np.ndarray,
                  prompt: np.ndarray) -> dict[str, Callable[[], object]]:  # fmt: skip
    """The timed calls of one layer (names ending in t2 run with 2 threads, numpy's BLAS included)."""
    return {
        "kernel t1": lambda: packed.gemv(x, threads=1), "kernel t2": lambda: packed.gemv(x, threads=2),
        "numpy fp32 t1": lambda: dense @ x, "numpy fp32 t2": lambda: dense @ x,
        "dequant+matvec": lambda: weight.dequantize() @ x,
        "gemm t1": lambda: packed.gemm(prompt, threads=1), "gemm t2": lambda: packed.gemm(prompt, threads=2),
        "numpy gemm t1": lambda: prompt @ dense.T, "numpy gemm t2": lambda: prompt @ dense.T,
    }  # fmt: skip


def bench_set(title: str, layers: dict[tuple[int, int], QuantizedWeight], args, set_blas) -> None:
    rng = np.random.default_rng(0)
    per_token = {"kernel t1": 0.0, "kernel t2": 0.0, "numpy fp32 t1": 0.0, "numpy fp32 t2": 0.0, "dequant+matvec": 0.0}
    prefill = {"kernel t1": 0.0, "kernel t2": 0.0, "numpy fp32 t1": 0.0, "numpy fp32 t2": 0.0}
    print(f"\n## {title}")
    print(f"{'shape':>16} {'packed KB':>9} | {'kernel t1 us':>12} {'t2 us':>7} {'GB/s t1':>7} {'t2':>5} | "
          f"{'numpy fp32 t1':>13} {'t2':>6} {'deq+mv':>7} | {'x fp32 t1':>9} {'t2':>5} {'x deq':>6} | "
          f"prefill {PROMPT_TOKENS} tok: {'kernel t1':>9} {'t2':>6} {'numpy t1':>8} {'t2':>6}")  # fmt: skip
    for shape, weight in layers.items():
        packed, dense = PackedLinear(weight), weight.dequantize()
        x = rng.standard_normal(shape[1]).astype(np.float32)
        prompt = rng.standard_normal((PROMPT_TOKENS, shape[1])).astype(np.float32)
        blas1, blas2 = (lambda: set_blas(1)), (lambda: set_blas(2))
        configs = layer_configs(weight, packed, dense, x, prompt)
        before = {name: (blas2 if name.endswith("t2") else blas1) for name in configs}
        t = time_all(configs, args.rounds, args.min_time, before)
        for name in per_token:
            per_token[name] += SHAPES[shape] * t[name]
        for ours, theirs in (("kernel t1", "gemm t1"), ("kernel t2", "gemm t2"), ("numpy fp32 t1", "numpy gemm t1"),
                             ("numpy fp32 t2", "numpy gemm t2")):  # fmt: skip
            prefill[ours] += SHAPES[shape] * t[theirs]
        def gbs(seconds: float, nbytes: int = packed.nbytes) -> float:
            return nbytes / seconds / 1e9

        name = f"{SHAPE_NAMES[shape]} {shape[0]}x{shape[1]}"
        print(f"{name:>16} {packed.nbytes / 1024:>9.1f} | {t['kernel t1'] * 1e6:>12.1f} {t['kernel t2'] * 1e6:>7.1f} "
              f"{gbs(t['kernel t1']):>7.2f} {gbs(t['kernel t2']):>5.2f} | {t['numpy fp32 t1'] * 1e6:>13.1f} "
              f"{t['numpy fp32 t2'] * 1e6:>6.1f} {t['dequant+matvec'] * 1e6:>7.0f} | "
              f"{t['numpy fp32 t1'] / t['kernel t1']:>9.2f} {t['numpy fp32 t2'] / t['kernel t2']:>5.2f} "
              f"{t['dequant+matvec'] / t['kernel t1']:>6.1f} | {'':>16}{t['gemm t1'] * 1e3:>9.2f}ms "
              f"{t['gemm t2'] * 1e3:>6.2f} {t['numpy gemm t1'] * 1e3:>8.2f} {t['numpy gemm t2'] * 1e3:>6.2f}")  # fmt: skip
    if len(layers) == len(SHAPES):
        print("all 210 linears, one token (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in per_token.items()))
        print(f"all 210 linears, {PROMPT_TOKENS}-token prefill (ms): "
              + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in prefill.items()))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.02, help="seconds per timed sample")
    args = parser.parse_args()
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}  cpus: {os.cpu_count()}  "
          f"kernel path: {'avx2' if isa_available('avx2') else 'scalar'}")  # fmt: skip
    print("columns: x fp32 = numpy fp32 matvec time / kernel time (same threads); x deq = dequantize+matvec / kernel t1")
    set_blas = blas_threads_setter()
    for title, (fractions, group) in MIXES.items():
        layers = {s: synthetic_weight(s[0], s[1], fractions, group, seed=i) for i, s in enumerate(SHAPES)}
        bits = 8 * sum(w.codes.nbytes for w in layers.values()) / sum(s[0] * s[1] for s in SHAPES)
        bench_set(f"{title} (group {group}, {bits:.2f} code bits)", layers, args, set_blas)
    real = real_layers()
    if real is None:
        print("\n(no cached quantized base under ~/.cache/lowra/quantized; real layers skipped)")
    else:
        bench_set(*real, args, set_blas)
    print(f"\nload after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
