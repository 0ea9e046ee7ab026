"""assign_precision at LLaMA-2-7B scale: the vectorized greedy against its plain-Python reference.

1,359,872 rows (32 layers x q,k,v,o,down: 4096 rows each, gate,up: 11008 rows each; down rows are 11008 wide,
the rest 4096), 3 options each: widths 1/2/4 at w*L + 16*2^w bits (codes + a float16 codebook), distortions
0.36/0.12/0.01 (about Gaussian Lloyd-Max MSE) x L x a lognormal row variance; budget 1.5 bits/param. Both must
return the same choice; the reference takes ~50-90 s, the vectorized version ~1-2 s (2 shared cores).
Usage: python bench/bench_allocation.py [--rows N] [--bits 1.5] [--skip-reference]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from lowra.sdk.quant.allocation import _assign_precision_reference, assign_precision


def llama7b_rows(rng: np.random.Generator, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Costs and distortions [rows, 3] shaped like LLaMA-2-7B's linear layers (or the first ``rows`` of them)."""
    per_layer = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # (out rows, row length)
    lengths = np.concatenate([np.full(o, length) for o, length in per_layer] * 32).astype(np.float64)
    if rows is not None:
        lengths = lengths[:rows]
    widths = np.array([1.0, 2.0, 4.0])
    costs = widths[None, :] * lengths[:, None] + 16 * 2 ** widths[None, :]
    variance = rng.lognormal(0.0, 1.0, lengths.size)
    dists = (variance * lengths)[:, None] * np.array([0.36, 0.12, 0.01])[None, :]
    return costs, dists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="first N rows only (default: all 1.36M)")
    parser.add_argument("--bits", type=float, default=1.5, help="budget in bits per parameter")
    parser.add_argument("--skip-reference", action="store_true", help="time only the vectorized version")
    args = parser.parse_args()
    costs, dists = llama7b_rows(np.random.default_rng(0), args.rows)
    params = (costs[:, 0] - 32).sum()  # width 1: L bits + 32 codebook bits
    budget = args.bits * params
    print(f"{costs.shape[0]:,} rows x {costs.shape[1]} options, budget {args.bits} bits/param ({budget:.4g} bits)")
    times = []
    for _ in range(3):  # best of 3: the machine is shared, and the first call also pays for page faults
        t0 = time.perf_counter()
        new = assign_precision(costs, dists, budget)
        times.append(time.perf_counter() - t0)
    t_new = min(times)
    spent = costs[np.arange(costs.shape[0]), new].sum()
    runs = ", ".join(f"{t:.2f}" for t in times)
    print(f"  vectorized: {t_new:6.2f} s (best of {runs})   widths 1/2/4: {np.bincount(new, minlength=3).tolist()}, "
          f"{spent / params:.6f} bits/param spent")
    if not args.skip_reference:
        t0 = time.perf_counter()
        old = _assign_precision_reference(costs, dists, budget)
        t_old = time.perf_counter() - t0
        print(f"  reference:  {t_old:6.2f} s   identical choice: {bool(np.array_equal(old, new))}  "
              f"speed-up {t_old / t_new:.0f}x")


if __name__ == "__main__":
    main()
