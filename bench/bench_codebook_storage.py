"""What cheaper codebook storage would buy the low-bit base: MSE/var of SmolLM2-135M at 2.0 effective bits when each
row's levels are stored as b-bit integers times one float16 scale instead of float16 (issue 11, item 4).

The quantized-base format stores every row's 2**w levels as float16 (16 bits each): at 2.0 bits that is ~0.10 bits
per weight, the overhead that keeps the base at MSE/var 0.131 where the target is <= 0.125 (docs/RESULTS.md). This
bench answers, before any format change, how far storing them as ``round(level / s) * s`` with ``s = float16(max |l|
/ (2**(b-1) - 1))`` per row gets: the knapsack is given the cheaper cost of each width (``b * 2**w + 16`` bits per
row instead of ``16 * 2**w``), so the saved bits buy wider rows at the same budget, and the levels are then rounded
to their integer grid before the error is measured. Same plan as bench_base_quantization.py's main table (no groups,
no calibration: weight MSE), every byte of the file counted as that bench counts it.

Columns: level bits (16 = today's float16), effective bits (the file with the cheaper codebooks), rows at 1/2/4 bits,
MSE/var with the fitted (unrounded) levels, with the stored (rounded) levels, and with the levels refit on their grid
(three Lloyd steps whose levels stay integers times the row's scale, each weight on its nearest level).

    python bench/bench_codebook_storage.py --level-bits 16,8,6,5,4 --threads 1
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import lowra.sdk.quant.base.plan as plan_module
from lowra.device_runtime.formats.bitpack import packed_bytes
from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.sdk.base_model import load_base
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.plan import plan_model

BUDGET = 2.0


def codebook_bits(width: int, level_bits: int) -> int:
    """Bits one row's codebook takes: float16 levels, or b-bit integers and one float16 scale."""
    return 16 * (1 << width) if level_bits == 16 else level_bits * (1 << width) + 16


def rounded_levels(levels: np.ndarray, level_bits: int) -> np.ndarray:
    """The levels as stored: on the row's integer grid (symmetric, 2**(b-1) - 1 steps per side), as float16."""
    if level_bits == 16:
        return levels.astype(np.float16)
    scale = np.float32(np.float16(np.abs(levels).max() / ((1 << (level_bits - 1)) - 1)))
    return (np.round(levels / scale) * scale).astype(np.float16) if scale > 0 else levels.astype(np.float16)


def refit_on_grid(row: np.ndarray, levels: np.ndarray, level_bits: int, steps: int = 3) -> np.ndarray:
    """Lloyd steps whose levels stay on the row's integer grid: each weight to its nearest stored level, then each
    level to the grid point nearest its cell's mean (the scale kept: it is fixed by the float levels' absmax)."""
    if level_bits == 16:
        return levels
    scale = np.float32(np.float16(np.abs(levels).max() / ((1 << (level_bits - 1)) - 1)))
    if scale <= 0:
        return levels
    grid = levels.astype(np.float64)
    limit = (1 << (level_bits - 1)) - 1
    for _ in range(steps):
        order = np.argsort(grid, kind="stable")
        edges = (grid[order][1:] + grid[order][:-1]) / 2
        cell = order[np.searchsorted(edges, row)]
        sums = np.bincount(cell, weights=row, minlength=grid.size)
        counts = np.bincount(cell, minlength=grid.size)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), grid)
        grid = np.clip(np.round(means / scale), -limit, limit) * float(scale)
    return np.sort(grid).astype(np.float16)


def nearest_error(row: np.ndarray, levels: np.ndarray) -> float:
    """Squared error of ``row`` with each weight on its nearest level."""
    grid = np.sort(levels.astype(np.float64))
    edges = (grid[1:] + grid[:-1]) / 2
    return float(((row - grid[np.searchsorted(edges, row)]) ** 2).sum())


def run(model, plan, level_bits: int) -> dict:
    original_size, original_costs = plan_module.serialized_size, plan.row_costs

    def size(layers, dense, metadata):  # the file with the cheaper codebooks (the plan checks its budget on it)
        file_bytes, header = original_size(layers, dense, metadata)
        saved = sum(16 * (1 << int(w)) - codebook_bits(int(w), level_bits) for q in layers.values() for w in q.widths)
        return file_bytes - saved // 8, header

    def costs():
        return np.concatenate([np.broadcast_to(
            np.array([8 * packed_bytes(i, w) + codebook_bits(w, level_bits) for w in CODED_WIDTHS], np.float64),
            (o, len(CODED_WIDTHS))) for o, i in plan.shapes])

    plan_module.serialized_size, plan.row_costs = size, costs
    try:
        base = plan.quantize(BUDGET, progress=False)
    finally:
        plan_module.serialized_size, plan.row_costs = original_size, original_costs
    fitted = stored = refit = energy = 0.0
    for name, q in base.layers.items():
        ref = model.get_submodule(name).weight.detach().double().numpy()
        books = np.asarray(q.codebooks, dtype=np.float32).copy()
        offset = 0
        for r, w in enumerate(q.widths):
            k = 1 << int(w)
            books[offset : offset + k] = rounded_levels(books[offset : offset + k], level_bits)
            refit += nearest_error(ref[r], refit_on_grid(ref[r], books[offset : offset + k], level_bits))
            offset += k
        q8 = type(q)(out_features=q.out_features, in_features=q.in_features, group_size=q.group_size, widths=q.widths,
                     codes=q.codes, codebooks=books.astype(np.float16), scales=q.scales)
        fitted += float(((q.dequantize().astype(np.float64) - ref) ** 2).sum())
        stored += float(((q8.dequantize().astype(np.float64) - ref) ** 2).sum())
        energy += float(ref.size * ref.var())
    widths = base.report["total"]["widths"]
    rows = sum(widths.values())
    return {"level_bits": level_bits, "effective_bits": float(base.bits_report()["effective_bits"]),
            "rows_pct": {w: round(100 * widths[w] / rows, 1) for w in widths},
            "mse_over_var_fitted": fitted / energy, "mse_over_var_stored": stored / energy,
            "mse_over_var_refit": refit / energy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--level-bits", default="16,8,6,5,4", help="comma-separated bits per stored level (16: float16)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_base().model
    t0 = time.perf_counter()
    plan = plan_model(model, QuantizeConfig(group_size=0, calibration=None), progress=False)
    print(f"plan: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'level bits':>10} {'eff. bits':>9} {'rows 1/2/4-bit %':>17} {'MSE/var fitted':>14} {'MSE/var stored':>14} "
          f"{'MSE/var refit':>13}")
    for level_bits in (int(b) for b in args.level_bits.split(",") if b):
        r = run(model, plan, level_bits)
        mix = "/".join(f"{r['rows_pct'][str(w)]:.0f}" for w in CODED_WIDTHS)
        print(f"{level_bits:>10} {r['effective_bits']:9.4f} {mix:>17} {r['mse_over_var_fitted']:14.4f} "
              f"{r['mse_over_var_stored']:14.4f} {r['mse_over_var_refit']:13.4f}", flush=True)


if __name__ == "__main__":
    main()
